"""The benchmark harness (``perf/``), without timing anything that matters: the seeded
round order, the compiled baselines that keep their hooks, and the page written from the
template and the stored sections."""

from __future__ import annotations

import types

import pytest
import torch

from perf import report, timing


def test_rounds_run_every_variant_once_per_round_in_a_seeded_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times, _ = timing.shuffled_rounds(fns, rounds=6, seed=3)
    assert all(len(t) == 6 for t in times.values())
    rounds = [calls[i:i + 4] for i in range(0, 24, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    again = []
    timing.shuffled_rounds({n: (lambda n=n: again.append(n)) for n in "abcd"}, 6, seed=3)
    assert again == calls


def test_the_probe_is_subtracted_per_call():
    clock = {"s": 0.0}

    def inner():
        clock["s"] += 10.0  # "ten seconds inside": more than the call itself took

    _, rest = timing.shuffled_rounds({"x": inner}, rounds=2, probe=lambda: clock["s"])
    assert all(r < -9 for r in rest["x"])


@pytest.mark.compile
def test_unique_compile_keeps_a_hooked_copy_apart_from_a_plain_one():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    hooked = torch.nn.Sequential(torch.nn.Linear(4, 4))
    hooked.load_state_dict(plain.state_dict())
    hooked[0].register_forward_hook(lambda m, a, o: o + 1)
    x = torch.randn(2, 4)
    first = timing.unique_compile(plain, "plain", backend="eager")
    second = timing.unique_compile(hooked, "hooked", backend="eager")
    assert torch.allclose(first(x), plain(x))
    assert torch.allclose(second(x), plain(x) + 1)


def test_the_page_is_the_template_with_the_stored_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", str(tmp_path / "results"))
    template, page = tmp_path / "page.md.in", tmp_path / "page.md"
    template.write_text("# Title\n\n<!-- results: core -->\n\n## Missing\n\n"
                        "<!-- results: missing -->\n")
    module = types.SimpleNamespace(table=lambda r: "| a |\n|---|\n| 1 |",
                                   targets=lambda r: "- met", ORDER="shuffled")
    context = dict(command="python -m perf", date="today", machine="a machine",
                   load_start="0.1", load_end="0.2")
    report.store("core", report.section(module, [1], context), [1])
    report.store("sweep", report.section(types.SimpleNamespace(), ["raw"], context), ["raw"])
    text = report.render(str(template), str(page))
    assert page.read_text() == text
    assert "Produced by `python -m perf` on today: a machine; load average 0.1" in text
    assert "| 1 |" in text and "Targets:\n\n- met" in text and "shuffled" in text
    assert "`python -m perf --only missing --write`" in text
    assert "## sweep (`perf/bench_sweep.py`)" in text and "```\nraw\n```" in text
