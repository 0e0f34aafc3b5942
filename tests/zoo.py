"""An architecture zoo: tiny random-init transformers models, traced with fxsight and
checked against hand-written forward hooks.

A helper module (not a test file): ``tests/test_zoo.py`` runs a representative set by
default and the whole zoo under the ``slow`` marker; ``python -m tests.zoo`` (from the
repository root) checks every architecture and writes ``docs/models.md``.

Each :class:`Arch` is (name, family, config overrides, model class, inputs). Its model
is built offline from ``AutoConfig.for_model(name, ...)`` with tiny sizes (2 layers,
hidden 32, vocab 128, few heads and experts) and called with default arguments, as
people call it (``model(input_ids)``; encoder-decoder models get ``decoder_input_ids``
by keyword). :func:`check` then does three things on the model's first layer (the first
element of its first ``ModuleList`` of layers):

- **save**: the layer's output and the model's output, against hooks on a plain forward;
- **patch**: two invokes; the second's layer output is the first's (rows of one batch),
  against a plain forward of the second input whose hook writes the first's value;
- **replace**: the layer's output set to a stored tensor, against a hook returning it.

and records the backend each trace ran on (``fx``, ``partly fx`` where some modules run
as opaque calls inside the captured graph, or ``hooks`` with the fallback warning).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# --- the table -------------------------------------------------------------------------

# tiny sizes, applied to each config key the architecture has (its defaults' keys)
TINY: dict[str, Any] = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=64, head_dim=8, max_position_embeddings=64,
    n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64, n_inner=64,
    d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, ffn_dim=64,
    num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
    embedding_size=32, max_source_positions=16, max_target_positions=64,
    image_size=32, patch_size=8, num_channels=3, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, decoder_start_token_id=0, layer_norm_epsilon=1e-5,
)


@dataclass(frozen=True)
class Arch:
    name: str                     # the config's model_type
    family: str                   # decoder, moe, state-space, encoder, encoder-decoder, vision, audio
    head: str = "causal"          # causal | base | masked | seq2seq | image
    inputs: str = "ids"           # ids | seq2seq | pixels | audio | whisper
    config: dict = field(default_factory=dict)  # overrides (after TINY)
    model_type: str = ""          # where the name is not the model_type (variants)
    layer: str = ""               # the module checked, where not the first layer

    @property
    def type(self) -> str:
        return self.model_type or self.name


def _a(name, family, head="causal", inputs="ids", model_type="", layer="", **config) -> Arch:
    return Arch(name, family, head, inputs, config, model_type, layer)


_VIT = dict(image_size=32, patch_size=8)
_STAGES = dict(hidden_sizes=[16, 32], depths=[1, 1])

ZOO: list[Arch] = [
    # decoder-only
    _a("gpt2", "decoder"), _a("gpt_neo", "decoder", attention_types=[[["global", "local"], 1]],
                              window_size=8),
    _a("gptj", "decoder", rotary_dim=4), _a("gpt_neox", "decoder"), _a("llama", "decoder"),
    _a("mistral", "decoder"), _a("qwen2", "decoder"), _a("qwen3", "decoder"),
    _a("gemma", "decoder"), _a("gemma2", "decoder"), _a("gemma3_text", "decoder"),
    _a("phi", "decoder"), _a("phi3", "decoder"), _a("falcon", "decoder"),
    _a("opt", "decoder", word_embed_proj_dim=32), _a("bloom", "decoder"),
    _a("mpt", "decoder", d_model=32, n_heads=4, n_layers=2, expansion_ratio=2),
    _a("codegen", "decoder", rotary_dim=4), _a("stablelm", "decoder"), _a("olmo", "decoder"),
    _a("olmo2", "decoder"), _a("cohere", "decoder"), _a("starcoder2", "decoder"),
    _a("granite", "decoder"), _a("persimmon", "decoder"), _a("biogpt", "decoder"),
    _a("xglm", "decoder"), _a("gpt_bigcode", "decoder"), _a("nemotron", "decoder"),
    _a("helium", "decoder"), _a("glm", "decoder"), _a("smollm3", "decoder"),
    _a("ctrl", "decoder", dff=64), _a("openai-gpt", "decoder"),
    # mixture of experts
    _a("mixtral", "moe"), _a("qwen2_moe", "moe", decoder_sparse_step=1),
    _a("qwen3_moe", "moe", decoder_sparse_step=1), _a("olmoe", "moe"),
    _a("dbrx", "moe", d_model=32, n_heads=4, n_layers=2,
       ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
       attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    _a("granitemoe", "moe"), _a("jetmoe", "moe", kv_channels=8), _a("phimoe", "moe"),
    _a("deepseek_v3", "moe", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, head_dim=4,
       qk_nope_head_dim=4, v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1),
    _a("gpt_oss", "moe", num_local_experts=4, sliding_window=8),
    _a("mixtral-eager", "moe", model_type="mixtral", experts_implementation="eager"),
    _a("qwen3_moe-eager", "moe", model_type="qwen3_moe", decoder_sparse_step=1,
       experts_implementation="eager"),
    # (its encoder runs as an opaque call: the check is on a decoder layer)
    _a("switch_transformers", "moe", "seq2seq", "seq2seq", layer="decoder.block.1",
       num_sparse_encoder_layers=1,
       num_sparse_decoder_layers=1, expert_capacity=8),
    # state-space and hybrids
    _a("mamba", "state-space", state_size=8, expand=2),
    _a("mamba2", "state-space", state_size=8, n_groups=1, expand=2, chunk_size=8, head_dim=16),
    _a("falcon_mamba", "state-space", state_size=8), _a("rwkv", "state-space",
                                                        attention_hidden_size=32),
    _a("jamba", "state-space", attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
       expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=4),
    _a("recurrent_gemma", "state-space", lru_width=32, attention_window_size=8,
       block_types=["recurrent", "attention"]),
    _a("lfm2", "state-space"),
    # encoders
    _a("bert", "encoder", "base"), _a("roberta", "encoder", "base"),
    _a("distilbert", "encoder", "base", dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    _a("albert", "encoder", "base", num_hidden_groups=2), _a("electra", "encoder", "base"),
    _a("deberta-v2", "encoder", "base"), _a("xlm-roberta", "encoder", "base"),
    _a("mpnet", "encoder", "base"), _a("modernbert", "encoder", "base"),
    _a("roformer", "encoder", "base"), _a("megatron-bert", "encoder", "base"),
    # encoder-decoder
    _a("t5", "encoder-decoder", "seq2seq", "seq2seq"),
    _a("bart", "encoder-decoder", "seq2seq", "seq2seq"),
    _a("mbart", "encoder-decoder", "seq2seq", "seq2seq"),
    _a("pegasus", "encoder-decoder", "seq2seq", "seq2seq"),
    _a("marian", "encoder-decoder", "seq2seq", "seq2seq"),
    _a("blenderbot", "encoder-decoder", "seq2seq", "seq2seq"),
    _a("m2m_100", "encoder-decoder", "seq2seq", "seq2seq"),
    _a("whisper", "encoder-decoder", "speech", "whisper", num_mel_bins=16),
    # vision
    _a("vit", "vision", "base", "pixels", **_VIT), _a("deit", "vision", "base", "pixels", **_VIT),
    _a("beit", "vision", "base", "pixels", **_VIT),
    _a("dinov2", "vision", "base", "pixels", **_VIT),
    _a("convnext", "vision", "base", "pixels", num_stages=2, **_STAGES),
    _a("resnet", "vision", "base", "pixels", embedding_size=16, **_STAGES),
    _a("regnet", "vision", "base", "pixels", embedding_size=16, **_STAGES),
    _a("swin", "vision", "base", "pixels", image_size=32, patch_size=4, embed_dim=16,
       depths=[1, 1], num_heads=[2, 2], window_size=4),
    # audio
    _a("wav2vec2", "audio", "base", "audio", conv_dim=[16, 16], conv_stride=[5, 2],
       conv_kernel=[10, 3], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
    _a("hubert", "audio", "base", "audio", conv_dim=[16, 16], conv_stride=[5, 2],
       conv_kernel=[10, 3], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
]

BY_NAME = {arch.name: arch for arch in ZOO}

# run by default in tests/test_zoo.py: one or two per family
REPRESENTATIVE = ["gpt2", "llama", "gemma2", "mixtral", "qwen3_moe", "mamba", "bert",
                  "t5", "bart", "vit", "resnet", "wav2vec2"]


# --- building --------------------------------------------------------------------------

def make_config(arch: Arch):
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(arch.type)
    keys = set(defaults.to_dict()) | set(getattr(defaults, "attribute_map", {}))
    kwargs = {k: v for k, v in TINY.items() if k in keys}
    for alias, real in getattr(defaults, "attribute_map", {}).items():
        if real in arch.config:  # (an alias would set it again)
            kwargs.pop(alias, None)
    kwargs.update(arch.config)
    return AutoConfig.for_model(arch.type, **kwargs)


_HEADS = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "speech": "AutoModelForSpeechSeq2Seq",
    "base": "AutoModel",
}


def build(arch: Arch, seed: int = 0) -> torch.nn.Module:
    """The tiny random-init model of ``arch`` (eval mode)."""
    import transformers
    from transformers.utils import logging as hf_logging

    config = make_config(arch)
    factory = getattr(transformers, _HEADS[arch.head])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        torch.manual_seed(seed)
        model = factory.from_config(config)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval()


def make_inputs(arch: Arch, model: torch.nn.Module, seed: int) -> tuple[tuple, dict]:
    """One row of inputs, as the model's forward takes them by default."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    vocab = getattr(config, "vocab_size", 128) or 128
    if arch.inputs == "ids":
        return (torch.randint(4, vocab, (1, 6), generator=generator),), {}
    if arch.inputs == "seq2seq":
        ids = torch.randint(4, vocab, (1, 6), generator=generator)
        dec = torch.randint(4, vocab, (1, 4), generator=generator)
        return (ids,), {"decoder_input_ids": dec}
    if arch.inputs == "pixels":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        return (torch.randn(1, 3, size, size, generator=generator),), {}
    if arch.inputs == "audio":
        return (torch.randn(1, 800, generator=generator),), {}
    if arch.inputs == "whisper":
        frames = 2 * config.max_source_positions
        feats = torch.randn(1, config.num_mel_bins, frames, generator=generator)
        dec = torch.randint(4, vocab, (1, 4), generator=generator)
        return (feats,), {"decoder_input_ids": dec}
    raise ValueError(arch.inputs)


def layer_path(model: torch.nn.Module) -> str:
    """The first layer: element 0 of the first ModuleList of at least two modules with
    parameters (the embeddings' lists aside)."""
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2 and \
                all(any(True for _ in m.parameters()) for m in module):
            return f"{path}.0"
    raise LookupError("no list of layers")


# --- checking --------------------------------------------------------------------------

def first_tensor(value: Any) -> torch.Tensor:
    """The main tensor of a model or layer output (logits, last hidden state, ...)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # ModelOutput
        for item in value.values():
            if isinstance(item, torch.Tensor):
                return item
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"no tensor in {type(value).__name__}")


@contextlib.contextmanager
def _hook(module: torch.nn.Module, fn: Callable):
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _write(output: Any, value: torch.Tensor) -> Any:
    """A layer output with its main tensor replaced (what a hook returns)."""
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, (tuple, list)):
        return type(output)((value, *output[1:]))
    raise TypeError(type(output).__name__)


@dataclass
class Result:
    name: str
    family: str
    layer: str = ""
    backend: str = ""           # fx | partly fx | hooks | (empty: not built)
    reason: str = ""            # the fallback warning, or the build error
    checks: dict = field(default_factory=dict)  # save/patch/replace -> "ok" | error
    opaque: list = field(default_factory=list)  # modules run as opaque calls
    seconds: float = 0.0
    without_cache: "Result | None" = None  # the same with use_cache=False

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(v == "ok" for v in self.checks.values())


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol=1e-5, rtol=1e-4) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
        diff = (a.float() - b.float()).abs().max().item()
        raise AssertionError(f"{what}: max difference {diff:.3g}")


def _reason(caught: list) -> str:
    for w in caught:
        text = str(w.message)
        if text.startswith("fxsight:"):
            return text[len("fxsight:"):].strip()
    return ""


def _opaque(tracer: Any) -> list[str]:
    from fxsight.capture.opaque import opaque_modules
    gm = getattr(tracer, "graph_module", None)
    return opaque_modules(gm) if gm is not None else []


def _backend(tracer: Any) -> str:
    if tracer.backend == "fx" and _opaque(tracer):
        return "partly fx"
    return tracer.backend


def check(arch: Arch, backend: str = "auto", extra: dict | None = None,
          invokes: bool = False) -> Result:
    """Build ``arch`` and run the three checks; never raises (failures are recorded).
    ``extra``: keyword arguments added to the model's inputs (``use_cache=False``).
    ``invokes``: patch from a second invoke (a batch of two: a second capture) rather
    than from the stored output of a clean run of the second input."""
    import fxsight

    result = Result(arch.name, arch.family)
    start = time.perf_counter()
    try:
        model = build(arch)
        args_a, kwargs_a = make_inputs(arch, model, 1)
        args_b, kwargs_b = make_inputs(arch, model, 2)
        kwargs_a.update(extra or {})
        kwargs_b.update(extra or {})
        path = result.layer = arch.layer or layer_path(model)
        layer = model.get_submodule(path)
    except Exception as error:  # noqa: BLE001 - recorded as not built
        result.reason = f"not built: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        result.seconds = time.perf_counter() - start
        return result
    nn = fxsight.NNsight(model, backend=backend)
    env = _envoy(nn, path)
    backends = set()
    opaque = set()
    caught_all: list = []

    def run(name: str, fn: Callable) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.no_grad():
                    tracer = fn()
                backends.add(_backend(tracer))
                opaque.update(_opaque(tracer))
                result.checks[name] = "ok"
            except Exception as error:  # noqa: BLE001 - recorded
                line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                result.checks[name] = f"{type(error).__name__}: {line[:300]}"
                if "--traceback" in sys.argv:
                    traceback.print_exc()
        caught_all.extend(caught)

    # references: plain forwards with hooks
    try:
        with torch.no_grad():
            seen = {}
            with _hook(layer, lambda m, i, o: seen.__setitem__("a", first_tensor(o).clone())):
                ref_out_a = first_tensor(model(*args_a, **kwargs_a)).clone()
            stored = seen["a"]
    except Exception as error:  # noqa: BLE001 - the plain model does not run
        result.reason = f"not run: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        result.seconds = time.perf_counter() - start
        return result

    def save():
        with nn.trace(*args_a, **kwargs_a) as tracer:
            hidden = _main(env.output).save()
            out = _main(nn.output).save()
        _close(hidden, stored, "layer output", atol=0, rtol=0)
        _close(out, ref_out_a, "model output", atol=1e-6, rtol=1e-5)
        return tracer

    def patch():
        if not invokes:
            return patch_stored()
        with torch.no_grad(), _hook(layer, lambda m, i, o: _write(o, stored)):
            expected = first_tensor(model(*args_b, **kwargs_b)).clone()
        with nn.trace() as tracer:
            with tracer.invoke(*args_a, **kwargs_a):
                source = _main(env.output)
            with tracer.invoke(*args_b, **kwargs_b):
                _main(env.output)[:] = source
                out = _main(nn.output).save()
        _close(out, expected, "patched output")
        return tracer

    def patch_stored():
        # the last position of the layer's output, from a clean run of the second input
        with torch.no_grad():
            clean = {}
            with _hook(layer, lambda m, i, o: clean.__setitem__("b", first_tensor(o).clone())):
                model(*args_b, **kwargs_b)
            source = clean["b"]

            def hook(m, i, o):
                value = first_tensor(o).clone()
                value[:, -1] = source[:, -1]
                return _write(o, value)

            with _hook(layer, hook):
                expected = first_tensor(model(*args_a, **kwargs_a)).clone()
        with nn.trace(*args_a, **kwargs_a) as tracer:
            _main(env.output)[:, -1] = source[:, -1]
            out = _main(nn.output).save()
        _close(out, expected, "patched output", atol=1e-6, rtol=1e-5)
        return tracer

    def replace():
        value = torch.randn(stored.shape, generator=torch.Generator().manual_seed(3))
        value = value.to(stored.dtype)
        with torch.no_grad(), _hook(layer, lambda m, i, o: _write(o, value)):
            expected = first_tensor(model(*args_a, **kwargs_a)).clone()
        with nn.trace(*args_a, **kwargs_a) as tracer:
            if isinstance(layer_output_type[0], torch.Tensor):
                env.output = value
            else:
                env.output[0][:] = value
            out = _main(nn.output).save()
        _close(out, expected, "replaced output", atol=1e-6, rtol=1e-5)
        return tracer

    layer_output_type = []
    with torch.no_grad(), _hook(layer, lambda m, i, o: layer_output_type.append(o)):
        model(*args_a, **kwargs_a)

    run("save", save)
    run("patch", patch)
    run("replace", replace)
    result.backend = " / ".join(sorted(backends)) if backends else "-"
    result.reason = _reason(caught_all)
    result.opaque = sorted(opaque)
    result.seconds = time.perf_counter() - start
    return result


def _main(proxy: Any) -> Any:
    """The main tensor of a traced output: itself, or its element 0."""
    shape = None
    try:
        shape = proxy.shape
    except Exception:  # noqa: BLE001 - not a tensor
        pass
    return proxy if shape is not None else proxy[0]


def _envoy(nn: Any, path: str) -> Any:
    env = nn
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


# --- docs/models.md --------------------------------------------------------------------

def table(results: list[Result]) -> str:
    """``docs/models.md``: one row per architecture, then the counts."""
    retried = any(r.without_cache is not None for r in results)
    lines = [
        "# Architectures checked (the zoo)",
        "",
        "Generated by `python -m tests.zoo --results F.jsonl --write` (see `tests/zoo.py`): "
        "tiny random-init models of transformers " + _versions() + ", called with default "
        "arguments (`use_cache` included: transformers' cache objects pass through the "
        "captured graph); on each, the first layer's output is saved, patched at its last "
        "position from a clean run of a second input and replaced by a stored tensor, and "
        "the results compared with hand-written forward hooks (`tests/test_zoo.py` also "
        "patches from a second invoke, one batch of two rows, on a representative set; "
        "`pytest -m slow tests/test_zoo.py` runs all of them).",
        "",
        "`fx`: captured whole; `partly fx`: captured with the listed modules as opaque "
        "calls (their insides run eagerly; a trace that reads or writes inside one runs on "
        "hooks); `hooks`: fell back to the hooks backend (reason given).",
        "",
        "| architecture | family | layer | runs on | opaque modules / fallback reason | "
        "save | patch | replace |" + (" with `use_cache=False` |" if retried else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if retried else ""),
    ]
    for r in results:
        cells = [_cell(r.checks.get(k)) for k in ("save", "patch", "replace")]
        lines.append(f"| {r.name} | {r.family} | `{r.layer}` | {r.backend or 'not built'} | "
                     f"{_why(r)} | {' | '.join(cells)} |" +
                     (f" {_other(r.without_cache)} |" if retried else ""))
    built = [r for r in results if r.checks]
    counts: dict[str, int] = {}
    for r in built:
        counts[r.backend] = counts.get(r.backend, 0) + 1
    on_graph = counts.get("fx", 0) + counts.get("partly fx", 0)
    lines += ["", f"{len(results)} architectures, {len(built)} built; with default "
              "arguments they run on " +
              ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) +
              f" ({on_graph} of {len(built)}, {100 * on_graph / max(len(built), 1):.0f}%, "
              f"wholly or partly on fx). All checks equal to hooks: "
              f"{sum(r.ok for r in built)} of {len(built)}.", ""]
    return "\n".join(lines)


def _why(r: Result) -> str:
    reason = ", ".join(f"`{m}`" for m in r.opaque) if r.opaque else r.reason
    reason = reason.replace("this model runs with the hooks backend: ", "")
    head, cut, tail = reason.partition(". If this type holds tensors")  # (torch's advice)
    if cut:
        reason = head + (" " + tail[tail.rfind("(with "):] if "as opaque calls)" in tail else "")
    return reason.replace("|", "\\|").replace("\n", " ")[:320]


def _other(r: "Result | None") -> str:
    if r is None:
        return ""
    checks = "all checks ok" if r.ok else "; ".join(
        f"{k}: {_cell(v)}" for k, v in r.checks.items() if v != "ok")
    why = _why(r)
    return f"{r.backend} ({checks}{'; ' + why if why else ''})"


def _cell(value: str | None) -> str:
    if value is None:
        return "-"
    if value == "ok":
        return "ok"
    return "FAIL: " + value.replace("|", "\\|")[:120]


def _versions() -> str:
    import transformers
    return f"{transformers.__version__} (torch {torch.__version__})"


def _to_json(result: Result) -> dict:
    data = dict(vars(result))
    if result.without_cache is not None:
        data["without_cache"] = _to_json(result.without_cache)
    return data


def _from_json(data: dict) -> Result:
    data = dict(data)
    other = data.pop("without_cache", None)
    result = Result(**data)
    result.without_cache = _from_json(other) if other else None
    return result


def main(argv: list[str]) -> None:
    """``python -m tests.zoo [names] [--write] [--results FILE] [--traceback]``: check the
    named architectures (all by default); ``--results`` appends each result to a JSON-lines
    file (and ``--write`` then tables every architecture found there)."""
    import json

    log = argv[argv.index("--results") + 1] if "--results" in argv else None
    names = [a for a in argv if not a.startswith("-") and a != log] or [a.name for a in ZOO]
    torch.set_num_threads(1)
    results = []
    for name in names if "--table" not in argv else []:  # (--table: only write it)
        arch = BY_NAME[name]
        result = check(arch)
        if "Cache" in result.reason and arch.head != "base" and result.checks:
            result.without_cache = check(arch, extra={"use_cache": False})
        results.append(result)
        if log is not None:
            with open(log, "a") as f:
                f.write(json.dumps(_to_json(result), default=str) + "\n")
        print(f"{name:22s} {result.backend or 'not built':10s} {result.seconds:6.1f}s "
              f"{result.checks} {', '.join(result.opaque)} {result.reason[:160]}", flush=True)
        if result.without_cache is not None:
            other = result.without_cache
            print(f"{'  use_cache=False':22s} {other.backend:10s} {other.seconds:6.1f}s "
                  f"{other.checks} {', '.join(other.opaque)} {other.reason[:160]}", flush=True)
    if "--write" in argv:
        import os
        if log is not None:
            found = {}
            with open(log) as f:
                for line in f:
                    result = _from_json(json.loads(line))
                    found[result.name] = result
            results = [found[a.name] for a in ZOO if a.name in found]
        target = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "docs", "models.md")
        with open(target, "w") as f:
            f.write(table(results))
        print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
