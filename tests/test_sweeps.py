"""Patching and steering sweeps (fxsight.patching / fxsight.sweeps).

- Every cell of ``activation_patching`` equals a hand-written one-cell-at-a-time loop with
  forward hooks (GPT-2 and Llama shapes; resid, attn, mlp and resid_pre sites; all
  positions), on the fx backend and on the hooks backend.
- Prefix reuse is visible in the rewritten graph: a cell at layer l computes nothing of the
  blocks before l (and, for the residual stream, of block l itself).
- Batches of one (site kind, layer) share one Program structure: one splice per group, the
  later (and padded) batches are runner-cache hits.
- ``steering_sweep`` equals hand-written hooks; ``attribution`` returns the same result type.
- PatchingResult: named axes, selection, top cells, text table, records, DataFrame (or a
  clear ImportError), PNG heatmap.
"""

from __future__ import annotations

import sys

import pytest
import torch

import fxsight
from fxsight import NNsight, patching
from graphs import graph_parameters
from models import tiny_gpt2, tiny_llama, train_tokenizer
from patching_loops import blocks, first, metric, pair, patching_loop

TOKENS = 7


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(n_layer=3)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_hidden_layers=3)


def _prompts(vocab: int = 128, position: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return pair(TOKENS, position=position, vocab=vocab)


def hooks_loop(model, clean, corrupted, metric, kinds, positions=None):
    """The reference: for each cell of every layer, one clean forward saving the site and one
    corrupted forward whose hook puts the clean value at that position (hand-written
    hooks, :func:`patching_loops.patching_loop`)."""
    positions = list(range(clean.shape[1])) if positions is None else positions
    return patching_loop(model, clean, corrupted, metric, kinds, range(len(blocks(model))),
                         positions)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_activation_patching_equals_a_one_cell_hooks_loop(name, request):
    model = request.getfixturevalue(name)
    clean, corrupted = _prompts()
    kinds = ["resid", "attn", "mlp", "resid_pre"]
    result = patching.activation_patching(NNsight(model), clean, corrupted, metric,
                                          sites=kinds, progress=False)
    expected = hooks_loop(model, clean, corrupted, metric, kinds)
    assert result.dims == ("site", "layer", "position")
    assert result.sites == kinds and result.layers == [0, 1, 2]
    assert result.positions == list(range(TOKENS))
    assert result.info["backend"] == "fx"
    assert result.info["logits_to_keep"] == 1  # the metric reads the last position only
    torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        reference = metric(model(clean, use_cache=False).logits)[0]
    assert result.reference == pytest.approx(float(reference), abs=1e-5)
    assert result.values.abs().max() > 1e-3  # the patches do something


def test_hooks_backend_gives_the_same_sweep(gpt2):
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    fx = patching.activation_patching(net, clean, corrupted, metric, progress=False)
    hooks = patching.activation_patching(net, clean, corrupted, metric, progress=False,
                                         backend="hooks")
    assert hooks.info["backend"] == "hooks"
    torch.testing.assert_close(fx.values, hooks.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind, absent, present", [
    ("resid", ["transformer.h.0.", "transformer.h.1.", "transformer.h.2."],
     ["transformer.h.3."]),
    # (an attention cell's MLP runs on the patched tokens only: a module call, not in the
    # graph; tests/test_suffix.py)
    ("attn", ["transformer.h.0.", "transformer.h.1.", "transformer.h.2.attn.",
              "transformer.h.2.ln_1.", "transformer.h.2.mlp."],
     ["transformer.h.2.ln_2.", "transformer.h.3."]),
    ("mlp", ["transformer.h.0.", "transformer.h.1.", "transformer.h.2.attn.",
             "transformer.h.2.ln_", "transformer.h.2.mlp."], ["transformer.h.3."]),
])
def test_cells_at_layer_l_compute_nothing_before_it(kind, absent, present):
    model = tiny_gpt2(n_layer=4)
    clean, corrupted = _prompts()
    result = patching.activation_patching(NNsight(model), clean, corrupted, metric,
                                          sites=[kind], layers=[2], progress=False)
    graph = result.info["graph_module"]
    used = graph_parameters(graph, model)
    for prefix in absent:
        assert not any(p.startswith(prefix) for p in used), (prefix, sorted(used))
    for prefix in present:
        assert any(p.startswith(prefix) for p in used), (prefix, sorted(used))
    assert "transformer.wpe.weight" not in used  # no embeddings either
    targets = {n.target for n in graph.graph.nodes}
    assert torch.ops.aten.embedding.default not in targets
    torch.testing.assert_close(
        result.values, hooks_loop(model, clean, corrupted, metric, [kind])[:, 2:3],
        rtol=1e-4, atol=1e-5)


def test_batches_share_one_structure_and_padding_is_dropped(gpt2):
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    whole = patching.activation_patching(net, clean, corrupted, metric, sites=["attn"],
                                         progress=False, suffix=False)
    before = fxsight.stats()
    # 7 positions in batches of 3: 3 batches per layer, the last one padded
    result = patching.activation_patching(net, clean, corrupted, metric, sites=["attn"],
                                          batch_size=3, progress=False, suffix=False)
    after = fxsight.stats()
    assert result.info["batch_size"] == 3
    assert result.info["traces"] == 2 + 3 * 3
    assert after["splices"] - before["splices"] == 3  # one per layer
    assert after["runner_hits"] - before["runner_hits"] == 3 * 2
    torch.testing.assert_close(result.values, whole.values, rtol=1e-4, atol=1e-5)
    # the same sweep again: every batch is a cache hit
    before = fxsight.stats()
    patching.activation_patching(net, clean, corrupted, metric, sites=["attn"],
                                 batch_size=3, progress=False, suffix=False)
    assert fxsight.stats()["splices"] == before["splices"]


def test_batch_size_comes_from_the_memory_budget(gpt2):
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    small = patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                         memory_budget=1, progress=False, suffix=False)
    large = patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                         progress=False, suffix=False)
    assert small.info["batch_size"] == 1
    assert large.info["batch_size"] == TOKENS  # at most one layer's cells
    torch.testing.assert_close(small.values, large.values, rtol=1e-4, atol=1e-5)


def test_positions_and_layers_select_cells(gpt2):
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    full = patching.activation_patching(net, clean, corrupted, metric, sites=["mlp"],
                                        progress=False)
    part = patching.activation_patching(net, clean, corrupted, metric, sites=["mlp"],
                                        positions=[1, -1], layers=[-1], progress=False)
    assert part.positions == [1, TOKENS - 1] and part.layers == [2]
    torch.testing.assert_close(part.values[0, 0], full.values[0, 2, [1, TOKENS - 1]],
                               rtol=1e-4, atol=1e-5)


def test_a_metric_reading_other_positions_gets_every_logit(gpt2):
    clean, corrupted = _prompts()

    def early(logits):
        return logits[:, 3, 7] + logits[:, -1].logsumexp(-1)

    result = patching.activation_patching(NNsight(gpt2), clean, corrupted, early,
                                          sites=["resid"], progress=False)
    assert result.info["logits_to_keep"] is None
    torch.testing.assert_close(result.values,
                               hooks_loop(gpt2, clean, corrupted, early, ["resid"]),
                               rtol=1e-4, atol=1e-5)


def test_language_model_takes_strings_of_equal_length():
    from fxsight import LanguageModel

    tokenizer = train_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    clean, corrupted = "The capital of Italy is", "The capital of Spain is"
    clean_ids = tokenizer(clean, return_tensors="pt")["input_ids"]
    corrupted_ids = tokenizer(corrupted, return_tensors="pt")["input_ids"]
    assert clean_ids.shape == corrupted_ids.shape
    result = patching.activation_patching(lm, clean, corrupted, metric, progress=False)
    assert result.tokens == tokenizer.convert_ids_to_tokens(clean_ids[0].tolist())
    expected = hooks_loop(model, clean_ids, corrupted_ids, metric, ["resid", "attn", "mlp"])
    torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="same number of tokens"):
        patching.activation_patching(lm, clean, "The capital of France is",
                                     metric, progress=False)



def test_attribution_refuses_prompts_of_different_lengths():
    # both prompts run in one trace: a LanguageModel pads the shorter one, so position p of
    # the clean run would be compared with another token of the corrupted run
    from fxsight import LanguageModel

    tokenizer = train_tokenizer()
    model = tiny_gpt2(n_layer=1, n_embd=32, vocab_size=len(tokenizer))
    lm = LanguageModel(model, tokenizer=tokenizer)
    for backend in ("fx", "hooks"):
        with pytest.raises(ValueError, match="same number of tokens"):
            patching.attribution(lm, "the cat sat on", "the dog sat on the mat", metric,
                                 backend=backend)
    clean, corrupted = "The capital of Italy is", "The capital of Spain is"
    clean_ids = tokenizer(clean, return_tensors="pt")["input_ids"]
    corrupted_ids = tokenizer(corrupted, return_tensors="pt")["input_ids"]
    result = patching.attribution(lm, clean, corrupted, metric)
    assert result.tokens == tokenizer.convert_ids_to_tokens(clean_ids[0].tolist())
    # the plain-PyTorch estimate: (clean - corrupted) . d metric / d block output
    block = model.transformer.h[0]
    store = {}
    handle = block.register_forward_hook(lambda m, a, o: store.__setitem__("clean", first(o)))
    with torch.no_grad():
        model(clean_ids)
    handle.remove()

    def leaf(module, args, output):
        store["corrupted"] = first(output).detach().requires_grad_()
        return (store["corrupted"], *output[1:]) if isinstance(output, tuple) \
            else store["corrupted"]
    handle = block.register_forward_hook(leaf)
    score = metric(model(corrupted_ids).logits).sum()
    handle.remove()
    grad, = torch.autograd.grad(score, store["corrupted"])
    expected = ((store["clean"] - store["corrupted"].detach()) * grad).sum(-1)
    torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-6)

def test_bad_arguments_are_reported(gpt2):
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    with pytest.raises(ValueError, match="sites must be"):
        patching.activation_patching(net, clean, corrupted, metric, sites=["heads"])
    with pytest.raises(ValueError, match="one number per row"):
        patching.activation_patching(net, clean, corrupted, lambda logits: logits[:, -1],
                                     progress=False)
    with pytest.raises(TypeError, match="tokenizer"):
        patching.activation_patching(net, "a string", corrupted, metric)
    with pytest.raises(ValueError, match="out of range"):
        patching.activation_patching(net, clean, corrupted, metric, layers=[3])



def test_positions_and_layers_as_arrays_and_empty_layers(gpt2):
    # NumPy / tensor positions were refused as "position tensor(0) is out of range", and
    # layers=[] failed with an IndexError
    import numpy as np

    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    arguments = dict(sites=["resid"], progress=False, suffix=False)
    plain = patching.activation_patching(net, clean, corrupted, metric, positions=[2, 6],
                                         layers=[1], **arguments)
    for positions, layers in ((np.array([2, -1]), np.array([1])),
                              (torch.tensor([2, 6]), torch.tensor(1))):
        result = patching.activation_patching(net, clean, corrupted, metric,
                                              positions=positions, layers=layers, **arguments)
        assert result.coords == plain.coords and type(result.positions[0]) is int
        assert torch.equal(result.values, plain.values)
    with pytest.raises(ValueError, match="layers is empty"):
        patching.activation_patching(net, clean, corrupted, metric, layers=[], **arguments)
    with pytest.raises(ValueError, match="position True is not an integer"):
        patching.activation_patching(net, clean, corrupted, metric, positions=[True],
                                     **arguments)


@pytest.mark.parametrize("options", [dict(), dict(suffix=False), dict(backend="hooks")])
def test_a_metric_that_mixes_the_rows_is_refused(gpt2, options):
    # one number per row, but not the row's own: a batch of cells gave every cell the
    # value of row 0's corrupted logit (a one-cell loop gives each its own), no error
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    mixes = [lambda logits: logits[:, -1, 5] - logits[0, -1, 6],
             lambda logits: logits[:, -1, 5] - logits[:, -1, 5].mean(),
             lambda logits: logits[:, -1, 5].softmax(0)]
    for mixed in mixes:
        with pytest.raises(ValueError, match="mixes the rows"):
            patching.activation_patching(net, clean, corrupted, mixed, sites=["resid"],
                                         layers=[1], progress=False, **options)
        with pytest.raises(ValueError, match="mixes the rows"):
            patching.head_patching(net, clean, corrupted, mixed, layers=[1],
                                   progress=False, **options)

# --- steering --------------------------------------------------------------------------------
def test_steering_sweep_equals_hand_written_hooks(gpt2):
    prompt = _prompts()[0]
    generator = torch.Generator().manual_seed(3)
    vectors = {"one": torch.randn(64, generator=generator),
               "per layer": torch.randn(3, 64, generator=generator)}
    scales = [-2.0, 0.5, 3.0]
    for positions in ("all", [-1]):
        result = patching.steering_sweep(NNsight(gpt2), prompt, vectors, scales=scales,
                                         metric=metric, positions=positions,
                                         progress=False)
        assert result.dims == ("vector", "layer", "scale")
        assert result.coords == {"vector": ["one", "per layer"], "layer": [0, 1, 2],
                                 "scale": scales}
        expected = torch.zeros(2, 3, 3)
        with torch.no_grad():
            baseline = metric(gpt2(prompt, use_cache=False).logits)[0]
            for v, vector in enumerate(vectors.values()):
                for layer, block in enumerate(gpt2.transformer.h):
                    for s, scale in enumerate(scales):
                        delta = scale * (vector[layer] if vector.dim() == 2 else vector)

                        def steer(m, args, output, delta=delta):
                            output = output.clone()
                            if positions == "all":
                                output += delta
                            else:
                                output[:, -1] += delta
                            return output

                        handle = block.register_forward_hook(steer)
                        try:
                            logits = gpt2(prompt, use_cache=False).logits
                        finally:
                            handle.remove()
                        expected[v, layer, s] = metric(logits)[0] - baseline
        torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-5)
        assert result.baseline == pytest.approx(float(baseline), abs=1e-5)


def test_steering_default_metric_and_batches(gpt2):
    prompt = _prompts()[0]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    result = patching.steering_sweep(NNsight(gpt2), prompt, vector, layers=[1],
                                     scales=[0.0, 1.0, 4.0], batch_size=2, progress=False)
    assert result.shape == (1, 1, 3)
    assert result.values[0, 0, 0] == pytest.approx(0.0, abs=1e-5)  # scale 0 changes nothing
    assert result.values[0, 0, 2] < 0  # the default metric: the unsteered prediction's
    # log-probability, which a large random push lowers


# --- attribution -----------------------------------------------------------------------------
def test_attribution_returns_the_same_result_type(gpt2):
    clean, corrupted = _prompts()
    net = NNsight(gpt2)

    result = patching.attribution(net, clean, corrupted, metric,
                                  sites=["resid", "attn", "mlp"], use_cache=False)
    exact = patching.activation_patching(net, clean, corrupted, metric, progress=False)
    assert isinstance(result, patching.PatchingResult)
    assert result.dims == exact.dims and result.coords == exact.coords
    legacy = patching.attribution(net, clean, corrupted, metric, use_cache=False)
    torch.testing.assert_close(result.sel(site="resid").values, legacy.values)
    assert result.baseline == pytest.approx(exact.baseline, abs=1e-5)
    # a first-order estimate of the same effects: it agrees on their sign where they are large
    large = exact.values.abs() > 0.5 * exact.values.abs().max()
    assert torch.equal(result.values[large].sign(), exact.values[large].sign())



@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_attribution_refuses_a_metric_of_many_numbers_per_row(gpt2, backend):
    # the score is the metric's sum: a metric giving a row of logits was summed, its
    # gradient silently that of the sum of the whole vocabulary
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    with pytest.raises(ValueError, match="one number per row"):
        patching.attribution(net, clean, corrupted, lambda logits: logits[:, -1],
                             backend=backend)
    assert all(p.grad is None for p in gpt2.parameters())
    column = patching.attribution(net, clean, corrupted, lambda logits: logits[:, -1, 5:6],
                                  backend=backend)
    scalar = patching.attribution(net, clean, corrupted, lambda logits: logits[0, -1, 5],
                                  backend=backend)
    torch.testing.assert_close(column.values, scalar.values)


def test_attribution_under_inference_mode_says_so(gpt2):
    # the backward's error blamed frozen parameters and plain inputs
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        patching.attribution(net, clean, corrupted, metric)
    with torch.no_grad():
        patching.attribution(net, clean, corrupted, metric)
        assert not torch.is_grad_enabled()


def test_attribution_takes_one_site_kind_as_a_string(gpt2):
    # sites="resid" was split into the modules 'r', 'e', ... (AttributeError on 'str')
    clean, corrupted = _prompts()
    net = NNsight(gpt2)
    one = patching.attribution(net, clean, corrupted, metric, sites="resid")
    listed = patching.attribution(net, clean, corrupted, metric, sites=["resid"])
    assert one.dims == ("site", "layer", "position") and one.coords == listed.coords
    torch.testing.assert_close(one.values, listed.values)
    with pytest.raises(TypeError, match="not both"):
        patching.attribution(net, clean, corrupted, metric,
                             sites=["resid", net.transformer.h[0]])

# --- the result object ---------------------------------------------------------------------------
def _result() -> patching.PatchingResult:
    values = torch.tensor([[[0.0, 1.0, -3.0], [0.5, 0.0, 0.0]],
                           [[0.0, 2.0, 0.0], [0.0, 0.0, 0.25]]])
    return patching.PatchingResult(values, ("site", "layer", "position"),
                                   {"site": ["resid", "attn"], "layer": [0, 1],
                                    "position": [0, 1, 2]},
                                   baseline=1.0, reference=5.0, tokens=["a", "b", "c"])


def test_result_axes_selection_and_top_cells():
    result = _result()
    assert result.top() == ("resid", 0, 2)
    assert result.top().value == -3.0 and result.top().layer == 0
    assert result.top(site="attn") == ("attn", 0, 1)
    assert [tuple(c) for c in result.top_k(2, layer=1)] == [("resid", 1, 0), ("attn", 1, 2)]
    assert result.sel(site="attn", layer=0).values.tolist() == [0.0, 2.0, 0.0]
    assert result.sel(layer=[1]).shape == (2, 1, 3)
    assert result.normalized().values[0, 0, 2] == pytest.approx(-0.75)
    records = result.to_records()
    assert records[2] == {"site": "resid", "layer": 0, "position": 2, "token": "c",
                          "value": -3.0}
    table = result.table(site="resid")
    assert "layer 0" in table and "-3.00" in table and "2:c" in table
    with pytest.raises(KeyError, match="no axis"):
        result.sel(head=0)



def test_cells_copy_and_pickle():
    import copy
    import pickle

    cell = _result().top()
    for again in (copy.copy(cell), copy.deepcopy(cell), pickle.loads(pickle.dumps(cell))):
        assert again == ("resid", 0, 2) and again.value == -3.0 and again.layer == 0
        assert repr(again) == repr(cell)

def test_to_dataframe_needs_pandas(monkeypatch):
    result = _result()
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass
    else:
        frame = result.to_dataframe()
        assert list(frame.columns) == ["site", "layer", "position", "token", "value"]
        assert len(frame) == 12
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_dataframe()


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "heatmap.png"
    figure = _result().plot(str(path), title="test", normalized=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == 3  # a panel per site kind and the colour bar


def test_top_cells_and_plot_skip_the_cells_a_pair_lacks(tmp_path):
    # a pair of a dataset of several lengths has NaN at the positions it lacks: such a
    # cell is not a score, never the top cell, and does not make the colour scale NaN
    values = torch.tensor([[float("nan"), 1.0, -3.0], [0.5, float("nan"), 0.25]])
    result = patching.PatchingResult(values, ("layer", "position"),
                                     {"layer": [0, 1], "position": [-3, -2, -1]})
    assert result.top() == (0, -1) and result.top().value == -3.0
    assert [tuple(c) for c in result.top_k(10)] == [(0, -1), (0, -2), (1, -3), (1, -1)]
    assert "value=-3" in repr(result)
    figure = result.plot(str(tmp_path / "nan.png"))
    assert figure.axes[0].images[0].get_clim() == (-3.0, 3.0)
    empty = patching.PatchingResult(torch.full((1, 2), float("nan")), ("layer", "position"),
                                    {"layer": [0], "position": [0, 1]})
    with pytest.raises(ValueError, match="no cell"):
        empty.top()


class _ExpertBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(8))

    def forward(self, x):
        return x + sum(expert(x) for expert in self.experts)


class _ExpertModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(_ExpertBlock() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_the_blocks_are_the_outermost_module_list():
    """A block's own ModuleList (8 experts) longer than the stack of blocks (2) is not
    taken for the blocks (was: the longest ModuleList, silently the experts)."""
    from fxsight.experiments.sweeps import find_layout
    layout = find_layout(NNsight(_ExpertModel()))
    assert [block.path for block in layout.blocks] == ["layers.0", "layers.1"]


def test_a_forward_keyword_of_one_prompts_row_is_named(gpt2):
    """(was: "inputs disagree on the batch size (input_ids has 3, attention_mask has 1
    rows)", which did not say that a sweep's cells are the rows of one batch)"""
    clean, corrupted = _prompts()
    mask = torch.ones(1, clean.shape[-1], dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask= of shape \(1, \d+\): a sweep "
                                         r"runs its cells as the rows of one batch"):
        patching.activation_patching(NNsight(gpt2), clean, corrupted, metric,
                                     sites=["resid"], progress=False, attention_mask=mask)
