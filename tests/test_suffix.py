"""The suffix path of activation patching (fxsight/experiments/suffix.py).

- Every cell equals the full-length path and a hand-written one-cell-at-a-time hooks loop
  (GPT-2 and Llama; resid, attn, mlp and resid_pre; every position; a subset of positions
  in chunks with padded rows), and the path actually ran (``info["suffix"] is True``).
- The rewritten graph of a layer-l cell holds only the blocks after l (the cache's updates
  are not outputs of a stopped trace), and the last block's MLP runs on the cells' last
  tokens only (one row per cell); an MLP that mixes tokens fails the self-check and runs
  whole, with the same scores as the full-length path. An attention cell's MLP runs on
  the patched tokens only (one row per cell), with the full-length path's scores.
- Packing: each cell's tokens and positions, every row filled (T + 1 tokens) with every
  position.
- Fallbacks say why: a metric reading other positions, a dataset, the hooks backend;
  ``suffix=True`` where it cannot apply raises.
- A stopped trace leaves a passed-in cache as it was.
"""

from __future__ import annotations

import pytest
import torch

from fxsight import NNsight, patching
from fxsight.experiments.suffix import pack, vocabulary_reads
from fxsight.generate.steps import CACHE
from graphs import graph_parameters, module_call_shapes
from models import tiny_gpt2, tiny_llama
from patching_loops import blocks, pair

TOKENS = 7
A, B = 5, 9


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(n_layer=3)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_hidden_layers=3)


def _prompts(tokens: int = TOKENS):
    return pair(tokens, position=2, shift=5)


def metric(logits):
    return logits[:, -1, A] - logits[:, -1, B]


def _hooks_loop(model, clean, corrupted, layer, position, metric):
    """One cell by hand: the clean block output at (layer, position) in the corrupted run."""
    saved = {}
    block = blocks(model)[layer]
    handle = block.register_forward_hook(lambda m, a, o: saved.__setitem__("h", o))
    with torch.no_grad():
        model(clean, use_cache=False)
        handle.remove()

        def patch(module, args, output):
            output = output.clone()
            output[:, position] = saved["h"][:, position]
            return output

        handle = block.register_forward_hook(patch)
        try:
            patched = model(corrupted, use_cache=False).logits
        finally:
            handle.remove()
        base = model(corrupted, use_cache=False).logits
    return float(metric(patched)[0] - metric(base)[0])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_suffix_path_equals_full_length_path_and_hooks(name, request):
    model = request.getfixturevalue(name)
    net = NNsight(model)
    clean, corrupted = _prompts()
    sites = ["resid", "attn", "mlp", "resid_pre"]
    fast = patching.activation_patching(net, clean, corrupted, metric, sites=sites,
                                        progress=False)
    full = patching.activation_patching(net, clean, corrupted, metric, sites=sites,
                                        progress=False, suffix=False)
    assert fast.info["suffix"] is True and full.info["suffix"] == "suffix=False"
    assert fast.info["vocabulary"] == [A, B]  # the head computed 2 entries only
    assert fast.info["last_mlp_on_last_tokens"] is True
    assert fast.values.abs().max() > 1e-3  # (cells that differ: the test can fail)
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5)
    assert fast.baseline == pytest.approx(full.baseline, abs=1e-5)
    assert fast.reference == pytest.approx(full.reference, abs=1e-5)
    for layer, position in [(0, 2), (1, 4), (2, 6), (1, 0)]:
        expected = _hooks_loop(model, clean, corrupted, layer, position, metric)
        assert float(fast.values[0, layer, position]) == pytest.approx(expected, abs=1e-5)


def test_chunks_of_a_position_subset_and_a_full_vocabulary_metric(gpt2):
    net = NNsight(gpt2)
    clean, corrupted = _prompts(9)

    def logprob(logits):  # reads every vocabulary entry: the full head runs
        return logits[:, -1].log_softmax(-1)[:, A]

    kwargs = dict(sites=["resid", "mlp"], positions=[0, 3, 4, 8], layers=[0, 2],
                  progress=False)
    fast = patching.activation_patching(net, clean, corrupted, logprob, batch_size=2,
                                        **kwargs)
    full = patching.activation_patching(net, clean, corrupted, logprob, suffix=False,
                                        **kwargs)
    assert fast.info["suffix"] is True and fast.info["vocabulary"] is None
    # position 0 comes before the prompts differ (at 2): those cells are not run; the
    # other three of each (site, layer) run in 2 chunks (one padded). So: 2 kinds x 2
    # layers x 2 chunks, 2 reference runs, 1 self-check (with the last MLP on the last
    # tokens: it passes, so nothing is checked apart)
    assert fast.info["cells_not_run"] == 2 * 2
    assert fast.info["traces"] == 2 * 2 * 2 + 2 + 1
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5)


def test_a_cell_computes_only_the_blocks_after_its_layer(gpt2, monkeypatch):
    shapes = module_call_shapes(monkeypatch)
    net = NNsight(gpt2)
    clean, corrupted = _prompts()
    result = patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                          layers=[1], progress=False)
    assert result.info["suffix"] is True
    graph = result.info["graph_module"]
    used = graph_parameters(graph, gpt2)
    assert used and all(n.startswith(("transformer.h.2.", "transformer.ln_f.")) for n in used), \
        sorted(used)
    # the last block's MLP is not in the captured part: it is called on the last tokens
    assert not any(n.startswith("transformer.h.2.mlp") for n in used)
    calls = [n for n in graph.graph.nodes if getattr(n.target, "module", None) is
             gpt2.transformer.h[2].mlp]
    assert len(calls) == 1
    width = gpt2.config.n_embd  # every position of layer 1 from the first one where the
    mlp = gpt2.transformer.h[2].mlp  # prompts differ (2): one row of one token each (the
    assert shapes == [(mlp, (2, 1, width)), (mlp, (TOKENS - 2, 1, width))]  # first call:
    # the self-check's two cells)


def test_an_mlp_with_a_one_token_path_runs_whole(monkeypatch):
    """The last MLP on one-token rows would be wrong for an MLP that computes otherwise on
    one token (a decoding fast path): the self-check sees it and the whole block runs."""
    model = tiny_gpt2(n_layer=2)
    mlp = model.transformer.h[1].mlp
    plain = type(mlp).forward
    monkeypatch.setattr(mlp, "forward",
                        lambda h: plain(mlp, h) * (2.0 if h.shape[1] == 1 else 1.0))
    net = NNsight(model)
    clean, corrupted = _prompts()
    fast = patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                        progress=False)
    full = patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                        progress=False, suffix=False)
    assert fast.info["suffix"] is True and fast.info["last_mlp_on_last_tokens"] is False
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5)


def test_packing_puts_each_suffix_at_its_positions():
    ids = torch.arange(10, 18).reshape(1, 8)
    packing = pack(ids, list(range(8)), torch.float32)
    assert packing.rows == 4 and packing.ids.shape == (4, 9)  # p and 7 - p share a row
    low = torch.finfo(torch.float32).min
    for p, (row, start) in enumerate(packing.segments):
        n = 8 - p
        assert packing.ids[row, start:start + n].tolist() == list(range(10 + p, 18))
        assert packing.position_ids[row, start:start + n].tolist() == list(range(p, 8))
        last = packing.mask[row, 0, start + n - 1]
        assert (last[:p] == 0).all() and (last[p:8] == low).all()  # the cache before p
        assert (last[8 + start:8 + start + n] == 0).all()  # its own segment
        assert int(packing.ends[1][p]) == start + n - 1 and int(packing.ends[0][p]) == row
    late = pack(ids, list(range(3, 8)), torch.float32)  # rows one longer than the longest
    assert late.ids.shape == (3, 6) and late.mask.shape == (3, 1, 6, 8 + 6)
    for p, (row, start) in zip(range(3, 8), late.segments):
        assert late.position_ids[row, start:start + 8 - p].tolist() == list(range(p, 8))
    odd = pack(torch.arange(5).reshape(1, 5), [0, 2, 4], torch.float32)
    assert odd.rows == 2  # lengths 5, 3, 1 in rows of 6: (5, 1) and (3 + padding)
    row, start = odd.segments[1]
    assert (odd.mask[row, 0, start + 3, 5 + start + 3] == 0)  # padding sees itself


def test_vocabulary_reads_of_a_traced_metric():
    logits = torch.randn(2, 3, 20)
    columns, small = vocabulary_reads(metric, logits)
    assert columns == [A, B]
    torch.testing.assert_close(small(logits[:, -1:, columns]), metric(logits))
    assert vocabulary_reads(lambda x: x[:, -1].softmax(-1)[:, 3], logits) is None


def test_fallbacks_say_why(gpt2):
    net = NNsight(gpt2)
    clean, corrupted = _prompts()

    def all_positions(logits):
        return logits[:, :, A].sum(-1)

    result = patching.activation_patching(net, clean, corrupted, all_positions,
                                          sites=["resid"], progress=False)
    assert result.info["suffix"] == "the metric reads positions other than the last"
    hooks = patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                         progress=False, backend="hooks")
    assert "hooks backend" in hooks.info["suffix"]
    pairs = patching.activation_patching(net, [clean, clean], [corrupted, corrupted],
                                         metric, sites=["resid"], progress=False)
    assert "dataset" in pairs.info["suffix"]
    with pytest.raises(ValueError, match="suffix path does not apply"):
        patching.activation_patching(net, clean, corrupted, all_positions, sites=["resid"],
                                     progress=False, suffix=True)


def test_a_stopped_trace_leaves_a_passed_in_cache_as_it_was(llama):
    clean, _ = _prompts()
    with torch.no_grad():
        cache = getattr(llama(clean[:, :4], use_cache=True), CACHE)
    before = [layer.keys.clone() for layer in cache.layers]
    net = NNsight(llama)
    with torch.no_grad(), net.trace(clean[:, 4:], **{CACHE: cache}, backend="fx") as tracer:
        hidden = net.model.layers[1].output.save()
        tracer.stop()
    assert tracer.backend == "fx"
    assert [layer.keys.shape for layer in cache.layers] == [b.shape for b in before]
    with torch.no_grad():
        plain = llama(clean[:, 4:], **{CACHE: cache}, use_cache=True,
                      output_hidden_states=True)
    torch.testing.assert_close(hidden, plain.hidden_states[2], rtol=0, atol=1e-5)


def test_an_attention_cells_mlp_runs_on_the_patched_tokens_only(gpt2, monkeypatch):
    shapes = module_call_shapes(monkeypatch)
    net = NNsight(gpt2)
    clean, corrupted = _prompts()
    fast = patching.activation_patching(net, clean, corrupted, metric, sites=["attn"],
                                        layers=[0], progress=False)
    full = patching.activation_patching(net, clean, corrupted, metric, sites=["attn"],
                                        layers=[0], progress=False, suffix=False)
    assert fast.info["patched_block_on_patched_tokens"] is True
    graph = fast.info["graph_module"]
    used = graph_parameters(graph, gpt2)
    # block 0: its attention is the patched site, its MLP runs as one-token rows
    assert {n for n in used if n.startswith("transformer.h.0.")} == \
        {"transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias"}, sorted(used)
    # (one row per cell that runs: positions 0 and 1, before the prompts differ, do not)
    assert (gpt2.transformer.h[0].mlp, (TOKENS - 2, 1, gpt2.config.n_embd)) in shapes
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5)
    assert fast.values.abs().max() > 0


@pytest.mark.parametrize("sweep", ["activation", "heads"])
def test_info_counts_every_trace_the_sweep_ran(gpt2, monkeypatch, sweep):
    from fxsight.api.tracer import Tracer

    entered = []
    enter = Tracer.__enter__
    monkeypatch.setattr(Tracer, "__enter__",
                        lambda self: (entered.append(self), enter(self))[1])
    net = NNsight(gpt2)
    clean, corrupted = _prompts()
    if sweep == "heads":
        result = patching.head_patching(net, clean, corrupted, metric, layers=[0, 1],
                                        batch_size=5, progress=False)
    else:
        result = patching.activation_patching(net, clean, corrupted, metric,
                                              sites=["resid", "attn"], batch_size=4,
                                              progress=False)
    assert result.info["suffix"] is True
    assert result.info["traces"] == len(entered)


def test_cells_whose_patch_changes_nothing_score_zero_and_are_not_run(gpt2, monkeypatch):
    """Before the first token where the prompts differ, a causal model's clean and corrupted
    values are equal bit for bit: patching there gives the corrupted run itself, whose
    effect a one-cell loop computes as 0 exactly. Those cells are not run; the others
    equal the full-length path. With equal prompts no cell runs at all."""
    from fxsight.api.tracer import Tracer

    entered = []
    enter = Tracer.__enter__
    monkeypatch.setattr(Tracer, "__enter__",
                        lambda self: (entered.append(self), enter(self))[1])
    net = NNsight(gpt2)
    clean, corrupted = _prompts()  # (they differ at position 2)
    sites = ["resid", "attn", "mlp"]
    fast = patching.activation_patching(net, clean, corrupted, metric, sites=sites,
                                        batch_size=TOKENS, progress=False)
    full = patching.activation_patching(net, clean, corrupted, metric, sites=sites,
                                        progress=False, suffix=False)
    assert fast.info["suffix"] is True
    assert fast.info["cells_not_run"] == len(sites) * 3 * 2
    assert torch.equal(fast.values[:, :, :2], torch.zeros(len(sites), 3, 2))
    for layer in range(3):
        assert _hooks_loop(gpt2, clean, corrupted, layer, 1, metric) == 0.0
    assert (fast.values[:, :2, 2:] != 0).all()  # (the others ran: layers 0 and 1 reach
    # the last position at every position; the last layer's only at the last one)
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5)

    entered.clear()
    same = patching.activation_patching(net, clean, clean.clone(), metric, sites=sites,
                                        progress=False)
    assert same.info["cells_not_run"] == same.values.numel()
    assert torch.equal(same.values, torch.zeros_like(same.values))
    # the two reference runs and the self-checks only
    assert same.info["traces"] == len(entered) <= 2 + 3


def test_a_language_model_takes_the_suffix_path(gpt2):
    """A ``LanguageModel``'s sweep runs its packed traces with the packing's own 4-D
    attention mask passed to the model as it is (it was refused as an attention mask
    'given twice', and every ``LanguageModel`` sweep took the full-length path)."""
    from fxsight import LanguageModel
    from models import train_tokenizer

    lm = LanguageModel(gpt2, tokenizer=train_tokenizer())
    clean, corrupted = _prompts()
    fast = patching.activation_patching(lm, clean, corrupted, metric, progress=False)
    full = patching.activation_patching(lm, clean, corrupted, metric, progress=False,
                                        suffix=False)
    assert fast.info["suffix"] is True, fast.info["suffix"]
    assert fast.values.abs().max() > 1e-3
    torch.testing.assert_close(fast.values, full.values, rtol=0, atol=1e-5)
    net_values = patching.activation_patching(NNsight(gpt2), clean, corrupted, metric,
                                              progress=False).values
    torch.testing.assert_close(fast.values, net_values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reduce", [lambda v: v.sum(), lambda v: v.mean(),
                                    lambda v: float(v[0])], ids=["sum", "mean", "row0"])
def test_a_metric_of_one_number_for_all_rows_is_refused(gpt2, reduce):
    """A metric that reduces over the rows (``.sum()``, ``.mean()``, row 0) gives one number
    for a batch of cells: on the suffix path it is a ValueError before any cell runs, as on
    the full-length path (was: that number silently became every cell's score of the
    batch)."""
    clean, corrupted = _prompts()
    net = NNsight(gpt2)

    def reducing(logits):
        return reduce(logits[:, -1, A] - logits[:, -1, B])

    for suffix in (True, False):
        with pytest.raises(ValueError, match="one number per row"):
            patching.activation_patching(net, clean, corrupted, reducing, sites=["resid"],
                                         suffix=suffix, progress=False)


def test_a_given_logits_to_keep_runs_the_full_length_path(gpt2):
    # the packed runs set logits_to_keep themselves; the caller's (here 1: every row's last
    # packed token only) made the self-check index past the kept logits (IndexError)
    net = NNsight(gpt2)
    clean, corrupted = _prompts()
    result = patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                          layers=[1], positions=[2, 5], progress=False,
                                          logits_to_keep=1)
    assert result.info["suffix"] == "the forward is given logits_to_keep"
    expected = torch.tensor([[[_hooks_loop(gpt2, clean, corrupted, 1, p, metric)
                               for p in (2, 5)]]])
    torch.testing.assert_close(result.values, expected, rtol=1e-4, atol=1e-5)
    heads = patching.head_patching(net, clean, corrupted, metric, layers=[1], positions=[2],
                                   progress=False, logits_to_keep=1)
    assert heads.info["suffix"] == "the forward is given logits_to_keep"



@pytest.mark.parametrize("suffix", [None, False])
def test_a_batch_size_below_one_is_refused_on_both_paths(gpt2, suffix):
    # the suffix path took batch_size=0 (or -1) as 1 without a word
    net = NNsight(gpt2)
    clean, corrupted = _prompts()
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            patching.activation_patching(net, clean, corrupted, metric, sites=["resid"],
                                         layers=[2], progress=False, batch_size=size,
                                         suffix=suffix)
