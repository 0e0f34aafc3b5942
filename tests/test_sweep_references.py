"""Every sweep entry point against a hand-written plain-PyTorch loop (forward hooks, one
cell at a time; ``patching_loops.py``): dtypes (float64 kept, half precision on CPU), prompts of different lengths,
positions counted from the end, batch sizes that do not divide the cells, several metrics,
models with tuple or tensor outputs, heads, and checkpoint/resume."""

from __future__ import annotations

import pytest
import torch

from fxsight import NNsight, patching
from models import tiny_gpt2, tiny_llama
from patching_loops import (first, forward_with, head_loop, logits_of, metric,
                             metric_all_positions, pair, patching_loop, site, steering_loop)

KINDS = ["resid", "attn", "mlp", "resid_pre"]


@pytest.fixture(scope="module")
def gpt2_64():
    return tiny_gpt2(n_layer=2).double()


@pytest.fixture(scope="module")
def llama_64():
    return tiny_llama(num_hidden_layers=2).double()


# --- float64 is kept ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2_64", "llama_64"])
def test_float64_model_gives_float64_scores_equal_to_a_float64_hooks_loop(name, request):
    model = request.getfixturevalue(name)
    clean, corrupted = pair(6)
    expected = patching_loop(model, clean, corrupted, metric, KINDS, [0, 1], range(6))
    assert expected.dtype == torch.float64
    # one cell a batch, full length: the loop's computation, to float64's last bits (the
    # sweep computes the last position's logits only, as the metric reads no other; on an
    # AVX-512 Xeon a one-row lm_head matmul rounds otherwise than the loop's six-row one,
    # by up to 2e-16: model(ids, logits_to_keep=1) differs from model(ids) there too)
    exact = patching.activation_patching(NNsight(model), clean, corrupted, metric, sites=KINDS,
                                         suffix=False, batch_size=1, progress=False)
    assert exact.values.dtype == torch.float64
    torch.testing.assert_close(exact.values, expected, rtol=1e-14, atol=1e-15, equal_nan=True)
    assert exact.baseline == float(metric(forward_with(model, corrupted))[0])
    for options in ({}, {"suffix": False}, {"backend": "hooks"}):
        result = patching.activation_patching(NNsight(model), clean, corrupted, metric,
                                              sites=KINDS, progress=False, **options)
        assert result.values.dtype == torch.float64, options
        torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-12)


# --- which blocks --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bart():
    from transformers import BartConfig, BartForConditionalGeneration
    config = BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=3,
                        encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BartForConditionalGeneration(config).eval()


def _bart_loop(model, blocks, clean, corrupted, positions):
    baseline = metric(forward_with(model, corrupted))[0]
    out = torch.zeros(len(blocks), len(positions))
    for layer, block in enumerate(blocks):
        store: list = []
        forward_with(model, clean, block, store=store)
        for i, position in enumerate(positions):
            def change(h, p=position, value=store[0]):
                h = h.clone()
                h[:, p] = value[:, p]
                return h
            out[layer, i] = metric(forward_with(model, corrupted, block, False, change))[0] - \
                baseline
    return out


def test_an_encoder_decoder_model_must_say_which_blocks(bart):
    """(was: the longest outermost ModuleList, silently the decoder's 3 blocks here, or
    the first of equal ones, the encoder's)"""
    clean, corrupted = pair(5)
    for sweep in (lambda: patching.activation_patching(NNsight(bart), clean, corrupted, metric,
                                                       sites=["resid"], progress=False),
                  lambda: patching.steering_sweep(NNsight(bart), clean, torch.ones(32),
                                                  progress=False),
                  lambda: patching.attribution(NNsight(bart), clean, corrupted, metric,
                                               sites=["resid"]),
                  lambda: patching.block_envoys(NNsight(bart))):
        with pytest.raises(ValueError, match=r"several stacks of blocks: "
                                             r"'model.encoder.layers' \(2 x BartEncoderLayer\), "
                                             r"'model.decoder.layers' \(3 x BartDecoderLayer\); "
                                             r"say which one to sweep over with blocks="):
            sweep()
    for path in ("model.encoder.layers", "model.decoder.layers"):
        result = patching.activation_patching(NNsight(bart), clean, corrupted, metric,
                                              sites=["resid"], blocks=path, progress=False)
        blocks = bart.get_submodule(path)
        expected = _bart_loop(bart, blocks, clean, corrupted, range(5))
        assert result.layers == list(range(len(blocks)))
        torch.testing.assert_close(result.values[0], expected, rtol=1e-4, atol=1e-5)
        assert result.values.abs().max() > 1e-4
    nn = NNsight(bart)
    assert [b.path for b in patching.block_envoys(nn, nn.model.decoder.layers)] == \
        [f"model.decoder.layers.{i}" for i in range(3)]
    assert [b.path for b in patching.block_envoys(nn, NNsight(bart).model.decoder.layers)] == \
        [f"model.decoder.layers.{i}" for i in range(3)]  # (another wrapper's envoy)
    with pytest.raises(ValueError, match=r"blocks='transformer.h' \(ModuleList\) is not a "
                                         r"module of the model swept over"):
        patching.block_envoys(nn, NNsight(tiny_gpt2()).transformer.h)
    with pytest.raises(ValueError, match=r"blocks='model.decoder' is a BartDecoder, not a "
                                         r"non-empty ModuleList"):
        patching.block_envoys(nn, "model.decoder")
    with pytest.raises(ValueError, match=r"no module 'model.decoderz.layers'"):
        patching.block_envoys(nn, "model.decoderz.layers")


# --- attribution ---------------------------------------------------------------------------
def attribution_loop(model, clean, corrupted, metric, kinds, layers):
    """(kinds, layers, positions): (clean - corrupted) . d metric / d site, each site's
    gradient from its own backward pass through a leaf put in by a hook; and the
    corrupted run's metric."""
    out = []
    for kind in kinds:
        rows = []
        for layer in layers:
            module, pre = site(model, kind, layer), kind == "resid_pre"
            store: list = []
            forward_with(model, clean, module, pre, store=store)
            leaf: list = []

            def change(h):
                leaf.append(h.detach().requires_grad_())
                return leaf[0]
            handle = module.register_forward_pre_hook(lambda m, a: (change(a[0]), *a[1:])) \
                if pre else module.register_forward_hook(
                    lambda m, a, o: (change(o[0]), *o[1:]) if isinstance(o, tuple)
                    else change(o))
            try:
                with torch.enable_grad():
                    measured = metric(logits_of(model(corrupted))).sum()
                    grad, = torch.autograd.grad(measured, leaf[0])
            finally:
                handle.remove()
            rows.append(((store[0] - leaf[0].detach()) * grad).sum(-1)[0])
        out.append(torch.stack(rows))
    return torch.stack(out), measured.detach()


def test_attribution_equals_a_hand_written_gradient_loop_in_float64(gpt2_64):
    """(was: over a dataset, ``baselines`` were float32 for a float64 model)"""
    pairs = [pair(6, 1, 2), pair(6, 3, 4)]
    result = patching.attribution(NNsight(gpt2_64), [c for c, _ in pairs],
                                  [k for _, k in pairs], metric, sites=KINDS)
    assert result.per_pair.dtype == result.baselines.dtype == torch.float64
    for i, (clean, corrupted) in enumerate(pairs):
        expected, baseline = attribution_loop(gpt2_64, clean, corrupted, metric, KINDS, [0, 1])
        torch.testing.assert_close(result.per_pair[i], expected, rtol=0, atol=1e-12)
        assert result.baselines[i].item() == pytest.approx(baseline.item(), rel=0, abs=1e-12)
    one = patching.attribution(NNsight(gpt2_64), *pairs[0], metric, sites=KINDS)
    torch.testing.assert_close(one.values, result.per_pair[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt2_64", "llama_64"])
def test_attribution_over_pairs_of_different_lengths_counts_positions_from_the_end(
        name, request):
    """(was: a ValueError, "group them by length first", where activation patching takes
    the same dataset) Each pair's scores sit at its last positions (NaN before), the mean
    is over the pairs that have the position, as activation patching's."""
    model = request.getfixturevalue(name)
    pairs = [pair(5, 1, 1), pair(7, 2, 3), pair(6, 3, 0)]
    result = patching.attribution(NNsight(model), [c for c, _ in pairs],
                                  [k for _, k in pairs], metric, sites=KINDS)
    assert result.positions == list(range(-7, 0))
    assert result.per_pair.shape == (3, len(KINDS), 2, 7)
    expected = torch.full((3, len(KINDS), 2, 7), float("nan"), dtype=torch.float64)
    for i, (clean, corrupted) in enumerate(pairs):
        scores, baseline = attribution_loop(model, clean, corrupted, metric, KINDS, [0, 1])
        expected[i, ..., 7 - clean.shape[1]:] = scores
        assert result.baselines[i].item() == pytest.approx(baseline.item(), rel=0, abs=1e-12)
    torch.testing.assert_close(result.per_pair, expected, rtol=0, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(result.values, expected.nanmean(0), rtol=0, atol=1e-12)
    assert result.counts[0, 0].tolist() == [1, 2, 3, 3, 3, 3, 3]
    swept = patching.activation_patching(NNsight(model), [c for c, _ in pairs],
                                         [k for _, k in pairs], metric, sites=KINDS,
                                         progress=False)
    assert swept.positions == result.positions and swept.dims == result.dims


# --- checkpoints ---------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def _failing_after(calls: int):
    """``metric`` that raises after ``calls`` calls: the job is interrupted mid-way."""
    count = [0]

    def failing(logits):
        count[0] += 1
        if count[0] > calls:
            raise _Interrupted
        return metric(logits)
    return failing


def test_an_interrupted_job_resumes_to_the_uninterrupted_result(gpt2_64, tmp_path,
                                                                monkeypatch):
    from fxsight.experiments import jobs
    monkeypatch.setattr(jobs, "CHECKPOINT_SECONDS", 0.0)
    nn = NNsight(gpt2_64)
    pairs = [pair(5, 1, 1), pair(7, 2, 3), pair(5, 3, 0)]
    clean, corrupted = [c for c, _ in pairs], [k for _, k in pairs]

    def sweep(chosen, **options):
        return patching.activation_patching(nn, clean, corrupted, chosen, sites=KINDS,
                                            positions=[-1, -2, 0], batch_size=3,
                                            progress=False, **options)
    whole = sweep(metric)
    for i, (c, k) in enumerate(pairs):
        expected = patching_loop(gpt2_64, c, k, metric, KINDS, [0, 1], [-1, -2, 0])
        torch.testing.assert_close(whole.per_pair[i], expected, rtol=0, atol=1e-12,
                                   equal_nan=True)
    path = tmp_path / "job.pt"
    with pytest.raises(_Interrupted):
        sweep(_failing_after(12), checkpoint=path)
    resumed = sweep(metric, checkpoint=path)
    assert 0 < resumed.info["resumed_batches"] < resumed.info["batches"]
    assert resumed.per_pair.dtype == torch.float64
    assert torch.equal(resumed.per_pair.nan_to_num(7.0), whole.per_pair.nan_to_num(7.0))


def test_a_checkpoint_of_other_steering_vectors_is_refused(gpt2_64, tmp_path):
    """(was: the job's key held the first 32 bytes of each vector, as float32: vectors that
    differ after their 8th entry, or below float32 precision, reused the other's scores)"""
    nn = NNsight(gpt2_64)
    prompt, _ = pair(5)
    first = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    later = first.clone()
    later[40] += 3.0
    tiny = first.clone()
    tiny[0] += 1e-12
    path = tmp_path / "steer.pt"
    patching.steering_sweep(nn, prompt, first, scales=[4.0], metric=metric, checkpoint=path,
                            progress=False)
    for other in (later, tiny):
        with pytest.raises(ValueError, match="written by another sweep"):
            patching.steering_sweep(nn, prompt, other, scales=[4.0], metric=metric,
                                    checkpoint=path, progress=False)
    expected = steering_loop(gpt2_64, prompt, [later], [0, 1], [4.0], metric, list(range(5)))
    fresh = patching.steering_sweep(nn, prompt, later, scales=[4.0], metric=metric,
                                    checkpoint=tmp_path / "other.pt", progress=False)
    torch.testing.assert_close(fresh.values, expected, rtol=0, atol=1e-12)


def test_a_checkpoint_of_other_blocks_is_refused(bart, tmp_path):
    """The encoder's and the decoder's blocks are two jobs, not one (same cells, same
    prompts, same unpatched metrics)."""
    clean, corrupted = pair(5)
    path = tmp_path / "job.pt"
    bart2 = bart  # (2 encoder and 3 decoder layers: layer 1 of each)
    patching.activation_patching(NNsight(bart2), [clean], [corrupted], metric, sites=["resid"],
                                 layers=[1], blocks="model.encoder.layers", checkpoint=path,
                                 progress=False)
    with pytest.raises(ValueError, match="written by another sweep"):
        patching.activation_patching(NNsight(bart2), [clean], [corrupted], metric,
                                     sites=["resid"], layers=[1],
                                     blocks="model.decoder.layers", checkpoint=path,
                                     progress=False)


def test_a_checkpoint_of_another_precision_is_refused(tmp_path):
    """(was: a float32 model's checkpoint resumed by its float64 copy: the unpatched
    metrics agree to the checkpoint's tolerance, so the float32 scores came back as the
    float64 job's)"""
    model = tiny_gpt2(n_layer=2)
    clean, corrupted = pair(5)
    path = tmp_path / "job.pt"
    patching.activation_patching(NNsight(model), clean, corrupted, metric, sites=["resid"],
                                 suffix=False, checkpoint=path, progress=False)
    double = tiny_gpt2(n_layer=2).double()
    with pytest.raises(ValueError, match="written by another sweep"):
        patching.activation_patching(NNsight(double), clean, corrupted, metric,
                                     sites=["resid"], suffix=False, checkpoint=path,
                                     progress=False)


def test_a_checkpoint_of_other_weights_is_refused_and_equal_weights_resume(tmp_path):
    """(was: the only check that a checkpoint was this model's was the unpatched metrics,
    to 1e-3: a model changed by a factor 1.0005 in one weight resumed every batch with the
    old model's scores, 2.3e-05 off). The same weights loaded again into a new object
    resume."""
    from transformers import GPT2LMHeadModel
    model = tiny_gpt2().double()
    clean, corrupted = pair(5)
    path = tmp_path / "job.pt"

    def sweep(chosen):
        return patching.activation_patching(NNsight(chosen), clean, corrupted, metric,
                                            sites=["resid"], suffix=False, checkpoint=path,
                                            progress=False)
    first = sweep(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "saved", dtype=torch.float64).eval()
    assert loaded is not model
    again = sweep(loaded)
    assert again.info["resumed_batches"] == again.info["batches"] > 0
    # (its attention implementation is the model's: another one refuses the checkpoint)
    torch.testing.assert_close(again.values, first.values, rtol=0, atol=1e-12)

    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight.mul_(1.0005)
    with pytest.raises(ValueError, match="other weights") as refused:
        sweep(model)
    assert str(path) in str(refused.value)
    expected = patching_loop(model, clean, corrupted, metric, ["resid"], [0, 1], range(5))
    fresh = patching.activation_patching(NNsight(model), clean, corrupted, metric,
                                         sites=["resid"], suffix=False, progress=False)
    torch.testing.assert_close(fresh.values, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(fresh.values, first.values, rtol=0, atol=1e-6)

    state = torch.load(path, weights_only=True)  # as an earlier fxsight wrote it
    del state["weights"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="holds no digest of the weights"):
        sweep(loaded)


def test_a_checkpoint_of_another_configuration_is_refused_and_the_same_model_resumes(
        tmp_path):
    """(was: a checkpoint was checked against the weights only: the same weights with
    another layer-norm epsilon, or eager attention instead of sdpa, resumed every batch with
    the first model's scores, the unpatched metrics within the tolerance.) The same model
    built again resumes; a checkpoint without the configuration (an earlier fxsight's) is
    refused, as one without the weights' digest."""
    from fxsight.experiments.weights import weights_digest
    clean, corrupted = pair(5)
    path = tmp_path / "job.pt"

    def sweep(chosen, checkpoint=path):
        return patching.activation_patching(NNsight(chosen), clean, corrupted, metric,
                                            sites=["resid"], suffix=False,
                                            checkpoint=checkpoint, progress=False)
    model = tiny_gpt2().double()
    first = sweep(model)
    again = sweep(tiny_gpt2().double())  # the same model, another object
    assert again.info["resumed_batches"] == again.info["batches"] > 0
    assert torch.equal(again.values, first.values)

    epsilon = tiny_gpt2(layer_norm_epsilon=1.1e-5).double()
    eager = tiny_gpt2().double()
    eager.set_attn_implementation("eager")
    for other, named in ((epsilon, "layer_norm_epsilon: 1e-05 then, 1.1e-05 now"),
                         (eager, "_attn_implementation_internal: 'sdpa' then, 'eager' now")):
        assert weights_digest(other) == weights_digest(model)
        with pytest.raises(ValueError, match="written by a model with another "
                                             "configuration") as refused:
            sweep(other)
        assert str(path) in str(refused.value) and named in str(refused.value)
        fresh = sweep(other, checkpoint=None)
        expected = patching_loop(other, clean, corrupted, metric, ["resid"], [0, 1], range(5))
        torch.testing.assert_close(fresh.values, expected, rtol=0, atol=1e-12)
        assert not torch.equal(fresh.values, first.values)  # another model's scores

    state = torch.load(path, weights_only=True)  # as an earlier fxsight wrote it
    del state["configuration"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="holds no record of the configuration"):
        sweep(model)


def test_the_configuration_is_the_same_model_s_wherever_it_is_built_or_loaded(tmp_path):
    """The description a checkpoint keeps beside the weights' digest: equal for the same
    model built again, deep-copied, saved and loaded again (in the same dtype), offloaded
    by accelerate or cast to another dtype (the digest has the dtypes); another config
    field, attention implementation, module attribute or mode is named."""
    import copy

    import accelerate
    from transformers import LlamaForCausalLM

    from fxsight.experiments.configuration import differences, model_configuration
    model = tiny_llama(num_hidden_layers=2)
    described = model_configuration(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    for same in (tiny_llama(num_hidden_layers=2), copy.deepcopy(model), loaded, offloaded,
                 copy.deepcopy(model).double()):
        assert model_configuration(same) == described, differences(
            described, model_configuration(same))

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    norm = copy.deepcopy(model)
    norm.model.layers[1].post_attention_layernorm.variance_epsilon = 1e-3
    trained = copy.deepcopy(model).train()
    for other, named in (
            (tiny_llama(num_hidden_layers=2, rms_norm_eps=1e-3), "config.rms_norm_eps"),
            (eager, "config._attn_implementation_internal"),
            (norm, "module model.layers.1.post_attention_layernorm.variance_epsilon"),
            (trained, "module (model).training")):
        assert named in differences(described, model_configuration(other))


def test_the_weights_digest_reads_values_not_storage():
    """Equal weights give one digest whatever their strides, and an accelerate-offloaded
    copy (meta parameters, values in the hook's weights_map) the plain model's; a meta
    parameter with no values anywhere is refused by name; a change of one entry, of a
    dtype or of a name is another digest."""
    import copy

    import accelerate
    from fxsight.experiments.weights import weights_digest
    model = tiny_llama(num_hidden_layers=2)
    digest = weights_digest(model)

    strided = copy.deepcopy(model)
    with torch.no_grad():
        weight = strided.model.layers[0].mlp.up_proj.weight
        weight.data = weight.data.t().contiguous().t()  # same values, other strides
    assert not weight.is_contiguous()
    assert weights_digest(strided) == digest

    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert offloaded.model.layers[1].mlp.up_proj.weight.is_meta
    assert weights_digest(offloaded) == digest

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 4] += 1e-7
    assert weights_digest(changed) != digest
    assert weights_digest(copy.deepcopy(model).double()) != digest

    bare = copy.deepcopy(model)
    bare.model.norm.weight = torch.nn.Parameter(torch.empty(64, device="meta"))
    with pytest.raises(ValueError, match="'model.norm.weight' of the model is on the meta"):
        weights_digest(bare)


# --- other model shapes, other dtypes ---------------------------------------------------------
class _Attention(torch.nn.Module):
    """Causal self-attention with 2 heads; returns ``(output, per-head values)`` or the
    output alone."""

    def __init__(self, width: int, returns_tuple: bool):
        super().__init__()
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out_proj = torch.nn.Linear(width, width)
        self.returns_tuple = returns_tuple

    def forward(self, x):
        rows, tokens, width = x.shape
        q, k, v = (t.view(rows, tokens, 2, width // 2).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, -1))
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.out_proj(heads.transpose(1, 2).reshape(rows, tokens, width))
        return (out, heads) if self.returns_tuple else out


class _Block(torch.nn.Module):
    def __init__(self, width: int, returns_tuple: bool):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.attn = _Attention(width, returns_tuple)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))
        self.returns_tuple = returns_tuple

    def forward(self, x):
        x = x + first(self.attn(self.norm(x)))
        x = x + self.mlp(x)
        return (x, x.mean()) if self.returns_tuple else x


class _Net(torch.nn.Module):
    """Blocks and a model that return tuples or tensors (the logits first)."""

    def __init__(self, returns_tuple: bool, width: int = 16, vocab: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(_Block(width, returns_tuple) for _ in range(2))
        self.head = torch.nn.Linear(width, vocab)
        self.returns_tuple = returns_tuple
        self.config = type("Config", (), {"num_attention_heads": 2})()

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = first(layer(x))
        logits = self.head(x)
        return (logits, x) if self.returns_tuple else logits


def test_a_checkpoint_of_a_plain_module_with_other_settings_is_refused(tmp_path):
    """A plain nn.Module's forward settings are its modules' attributes (a LayerNorm's
    eps, a GELU's approximation): another value refuses the checkpoint by name (was:
    resumed with the first model's scores); a deep copy resumes."""
    import copy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Net(False).double().eval()
    clean, corrupted = pair(6, vocab=32)
    path = tmp_path / "job.pt"

    def sweep(chosen, checkpoint=path):
        return patching.activation_patching(NNsight(chosen), clean, corrupted, metric,
                                            sites=["resid"], batch_size=5,
                                            checkpoint=checkpoint, progress=False)
    first = sweep(model)
    again = sweep(copy.deepcopy(model))
    assert again.info["resumed_batches"] == again.info["batches"] > 0
    assert torch.equal(again.values, first.values)

    norm = copy.deepcopy(model)
    norm.layers[1].norm.eps = 1e-3
    gelu = copy.deepcopy(model)
    gelu.layers[0].mlp[1].approximate = "tanh"
    for other, named in ((norm, "module layers.1.norm.eps: 1e-05 then, 0.001 now"),
                         (gelu, "module layers.0.mlp.1.approximate: 'none' then, 'tanh' now")):
        with pytest.raises(ValueError, match="another configuration") as refused:
            sweep(other)
        assert named in str(refused.value)
        fresh = sweep(other, checkpoint=None)
        expected = patching_loop(other, clean, corrupted, metric, ["resid"], [0, 1], range(6))
        torch.testing.assert_close(fresh.values, expected, rtol=0, atol=1e-12)
        assert not torch.equal(fresh.values, first.values)


@pytest.mark.parametrize("returns_tuple", [False, True])
def test_tuple_and_tensor_outputs_equal_a_hooks_loop_in_float64(returns_tuple):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Net(returns_tuple).double().eval()
    clean, corrupted = pair(6, vocab=32)
    for chosen in (metric, metric_all_positions):
        expected = patching_loop(model, clean, corrupted, chosen, KINDS, [0, 1], range(6))
        for options in ({}, {"backend": "hooks"}):
            result = patching.activation_patching(NNsight(model), clean, corrupted, chosen,
                                                  sites=KINDS, batch_size=5, progress=False,
                                                  **options)
            assert result.values.dtype == torch.float64
            torch.testing.assert_close(result.values, expected, rtol=0, atol=1e-12)
    heads = patching.head_patching(NNsight(model), clean, corrupted, metric, batch_size=5,
                                   progress=False)
    torch.testing.assert_close(heads.values, head_loop(model, clean, corrupted, metric, [0, 1],
                                                       range(6), 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_are_the_metrics_differences_in_float32(dtype):
    """On CPU in half precision: the metric's values are the loop's bit for bit, their
    differences taken in float32 (a guard: this held before)."""
    model = tiny_llama(num_hidden_layers=2).to(dtype)
    clean, corrupted = pair(6)

    def in_float32(logits):  # the loop subtracts in float32 too
        return metric(logits).float()
    expected = patching_loop(model, clean, corrupted, in_float32, KINDS, [0, 1], range(6))
    for options in ({}, {"suffix": False}):
        result = patching.activation_patching(NNsight(model), clean, corrupted, metric,
                                              sites=KINDS, progress=False, **options)
        assert result.values.dtype == torch.float32
        assert torch.equal(result.values, expected), options
