"""``docs/performance.md``, written from the benchmarks' own output.

The page is ``perf/performance.md.in`` (the prose that does not depend on a measurement)
with every ``<!-- results: NAME -->`` line replaced by the last stored section of
benchmark ``NAME``: ``perf/results/NAME.md``, written by ``python -m perf --write`` for
each benchmark it ran (with the command, the machine, the load average and the date),
beside the raw numbers in ``perf/results/NAME.json``. A benchmark without a marker in the
template (a new ``perf/bench_*.py`` with ``run()``) gets a section of its own at the end.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "performance.md.in")
RESULTS = os.path.join(HERE, "results")
PAGE = os.path.join(os.path.dirname(HERE), "docs", "performance.md")
UNSHUFFLED = "variants in a fixed order (this benchmark does not shuffle them)"
MARKER = re.compile(r"^<!-- results: ([\w-]+) -->$", re.MULTILINE)


def section(module: Any, results: Any, context: dict[str, str]) -> str:
    """The markdown of one benchmark's run: how it was produced, its table, and the
    module's ``targets(results)`` and ``noise(results)`` where it has them."""
    lines = [f"Produced by `{context['command']}` on {context['date']}: "
             f"{context['machine']}; load average {context['load_start']} at the start, "
             f"{context['load_end']} at the end; "
             f"{getattr(module, 'ORDER', UNSHUFFLED)}.", ""]
    busy = max(float(context["load_start"]), float(context["load_end"]))
    if busy > (os.cpu_count() or 1):
        lines += [f"**The machine was oversubscribed during this run** (load average up to "
                  f"{busy:.1f} on {os.cpu_count()} cores, from other work): every call took "
                  f"many times its quiet duration, so the ratios and the verdicts below are "
                  f"not measurements of fxsight. Run it again on a quiet machine.", ""]
    table: Callable | None = getattr(module, "table", None)
    text = table(results) if table else "\n".join(map(str, results))
    lines += [text if text.lstrip().startswith(("|", "**")) else f"```\n{text}\n```"]
    for name, title in (("targets", "Targets"), ("noise", "Noise")):
        extra = getattr(module, name, None)
        found = extra(results) if extra else ""
        if found:
            lines += ["", f"{title}:", "", found]
    return "\n".join(lines) + "\n"


def store(name: str, markdown: str, results: Any) -> None:
    """Keep one benchmark's section and raw results under ``perf/results/``."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as file:
        file.write(markdown)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as file:
        json.dump(results, file, indent=1, default=str)


# what a section says before its first stored run, where the default does not fit
NOT_RUN = {"gpu": "Not yet run on a GPU: `python -m perf --device cuda --write` on a machine "
                  "with a CUDA device writes this section (the whole command, with nnsight "
                  "and the timeout it needs, is in `perf/bench_gpu.py`'s docstring).\n"}


def _stored(name: str) -> str:
    path = os.path.join(RESULTS, f"{name}.md")
    if not os.path.exists(path):
        return NOT_RUN.get(name, f"Not measured yet: `python -m perf --only {name} --write` "
                                 f"writes this section.\n")
    with open(path) as file:
        return file.read()


def render(template: str = TEMPLATE, page: str = PAGE) -> str:
    """Write ``page`` from ``template`` and the stored sections; the page's text."""
    with open(template) as file:
        text = file.read()
    named = set(MARKER.findall(text))
    text = MARKER.sub(lambda match: _stored(match.group(1)).rstrip("\n"), text)
    others = sorted(f[:-3] for f in os.listdir(RESULTS) if f.endswith(".md")) \
        if os.path.isdir(RESULTS) else []
    for name in (n for n in others if n not in named):
        text += f"\n## {name} (`perf/bench_{name}.py`)\n\n{_stored(name)}"
    with open(page, "w") as file:
        file.write(text)
    return text


def now() -> str:
    """The date and time (UTC), to the minute."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
