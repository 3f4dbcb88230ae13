"""Fused projections on the packed path (`models.fusion.fuse_projections`): q/k/v stacked into
one `qkv_proj`, gate/up into one `gate_up_proj`, the old names kept as `RowSlice` views.

The references are the unfused model, loaded by the same loader with fusion switched off
(`_load_unfused`), and HF transformers for the tiny GGUF models. Fusion changes no
arithmetic (each output column is computed from its own row of the weight), so logits,
greedy continuations and the views' weights must be *equal*, not close; parameter counts
and bytes of the architecture summary must be the unfused model's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import lucidlm
import lucidlm.loading.load as load_module
from lucidlm.generate import generate_tokens
from lucidlm.introspect.architecture import describe
from lucidlm.models.fusion import RowSlice, fuse_projections
from lucidlm.models.packed import DENSE_FROM_ROWS, GROUP, Int4Linear, Int8Linear
from lucidlm.sampling import SamplingParams, make_sampler
from prompts import PASSAGE

PARTS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}

# These tests are about PyTorch's weight-only kernels: they run there even where ours would.
pytestmark = pytest.mark.usefixtures("pytorch_weight_only_kernels")


def _load_unfused(name: str):
    """The model as the loader made it before fusion existed: the same code path, fusion a no-op."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(load_module, "fuse_projections", lambda model, *args: 0)
        return lucidlm.load(name, progress=False, dtype="packed")


def _buffer_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def _assert_same_logits(fused, unfused, ids: list[int], decode_steps: int):
    """Prefill of the whole prompt (the dense path if >= DENSE_FROM_ROWS tokens), prefill of its
    first 6 tokens (the kernels), then `decode_steps` cached one-token steps: all equal."""
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        for n in (len(ids), 6):
            assert torch.equal(fused.model(tokens[:, :n]), unfused.model(tokens[:, :n])), n
        caches = fused.model.new_cache(1, 64), unfused.model.new_cache(1, 64)
        for m, cache in zip((fused, unfused), caches):
            m.model(tokens[:, :6], cache)
        for t in ids[6 : 6 + decode_steps]:
            a, b = (m.model(torch.tensor([[t]]), cache) for m, cache in zip((fused, unfused), caches))
            assert torch.equal(a, b)


def _assert_views_match(fused_model, unfused_model):
    """Every view has the unfused layer's shape, weight and output; returns how many layers were fused."""
    x = torch.randn(2, 5, fused_model.config.d_model, generator=torch.Generator().manual_seed(0))
    fused_count = 0
    for block_f, block_u in zip(fused_model.layers, unfused_model.layers):
        for parent, (fused_name, names) in PARTS.items():
            pf, pu = block_f.get_submodule(parent), block_u.get_submodule(parent)
            assert getattr(pu, fused_name) is None
            if getattr(pf, fused_name) is None:
                continue
            fused_count += 1
            for name in names:
                view, original = getattr(pf, name), getattr(pu, name)
                assert isinstance(view, RowSlice) and view.fused is getattr(pf, fused_name)
                assert (view.in_features, view.out_features) == (original.in_features, original.out_features)
                assert torch.equal(view.weight, original.weight), name
                with torch.inference_mode():
                    assert torch.equal(view(x), original(x)), name
    return fused_count


# ----- the modules themselves -----

def _random_int4(n: int, k: int, seed: int, bias: bool) -> Int4Linear:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // GROUP, generator=g) * 0.1
    offset = -8 * scale + torch.randn(n, k // GROUP, generator=g) * 0.01
    return Int4Linear(q, scale, offset, torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("biases", [(False, False, False), (True, True, True), (True, False, True)],
                         ids=["no-bias", "bias", "some-bias"])
def test_int4_concat_outputs_are_the_parts_outputs(biases):
    parts = [_random_int4(n, 256, seed, b) for seed, (n, b) in enumerate(zip((64, 32, 48), biases))]
    fused = Int4Linear.concat(parts)
    assert (fused.out_features, fused.in_features) == (144, 256)
    assert (fused.bias is None) == (not any(biases))
    assert torch.equal(fused.weight, torch.cat([p.weight for p in parts]))
    for m in (1, 3, DENSE_FROM_ROWS - 1, DENSE_FROM_ROWS, DENSE_FROM_ROWS + 8):  # the int4 kernel and the dense path
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1)), m
    # the views: rows of the fused layer, no weights of their own
    start = 0
    for p in parts:
        view = RowSlice(fused, start, start + p.out_features, "fused")
        start += p.out_features
        assert list(view.buffers()) == [] and list(view.parameters()) == []
        assert torch.equal(view.weight, p.weight)
        if p.bias is None:  # zeros where other parts have a bias
            assert view.bias is None or not view.bias.any()
        else:
            assert torch.equal(view.bias, p.bias)
        x = torch.randn(2, 3, 256)
        assert torch.equal(view(x), p(x))


def test_int4_concat_rejects_different_in_features():
    with pytest.raises(ValueError, match="in_features"):
        Int4Linear.concat([_random_int4(32, 256, 0, False), _random_int4(32, 128, 1, False)])


def test_int8_concat_outputs_are_the_parts_outputs():
    g = torch.Generator().manual_seed(0)
    parts = [Int8Linear.quantize(torch.randn(n, 128, generator=g)) for n in (48, 16)]
    fused = Int8Linear.concat(parts)
    assert torch.equal(fused.weight, torch.cat([p.weight for p in parts]))
    for m in (1, 5, 40):
        x = torch.randn(m, 128, generator=g)
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1)), m


# ----- tiny GGUF models, against HF transformers -----

def _tiny_gguf(tmp_path, mixed: bool):
    """A tiny Llama as Q4_1 GGUF (and the HF model holding the same weights). `mixed`: layer 0's
    v and layer 1's up stored as Q8_0 instead (loaded as Int8Linear), as Q4_K_M files mix types."""
    import gguf
    from test_loading_gguf import hf_llama_and_gguf_tensors, tiny_metadata, write_gguf

    hf_model, tensors = hf_llama_and_gguf_tensors(tie=True, encoding=T.Q4_1)
    if mixed:
        params = dict(hf_model.named_parameters())
        for hf_name, g_name in [("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
                                ("model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight")]:
            w = params[hf_name].detach().numpy()
            stored = gguf.quants.quantize(w, T.Q8_0)
            with torch.no_grad():
                params[hf_name].copy_(torch.from_numpy(gguf.quants.dequantize(stored, T.Q8_0).reshape(w.shape)))
            tensors[g_name] = (stored, T.Q8_0)
    return hf_model, write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors)


@pytest.mark.parametrize("mixed", [False, True], ids=["all-q4_1", "mixed-q4_1-q8_0"])
def test_tiny_fused_model(tmp_path, mixed):
    from test_loading_gguf import VOCAB_SIZE

    hf_model, path = _tiny_gguf(tmp_path, mixed)
    fused, unfused = lucidlm.load(str(path), progress=False, dtype="packed"), _load_unfused(str(path))
    attn0, mlp1 = fused.model.layers[0].self_attn, fused.model.layers[1].mlp
    if mixed:  # a group with an Int8Linear part stays as it was; the other groups are fused
        assert attn0.qkv_proj is None and isinstance(attn0.v_proj, Int8Linear) and isinstance(attn0.q_proj, Int4Linear)
        assert mlp1.gate_up_proj is None and isinstance(mlp1.up_proj, Int8Linear)
        assert isinstance(fused.model.layers[0].mlp.gate_up_proj, Int4Linear)
        assert isinstance(fused.model.layers[1].self_attn.qkv_proj, Int4Linear)
    else:
        assert isinstance(attn0.qkv_proj, Int4Linear) and isinstance(mlp1.gate_up_proj, Int4Linear)
    assert _assert_views_match(fused.model, unfused.model) == (2 if mixed else 4)
    ids = np.random.default_rng(1).integers(0, VOCAB_SIZE, size=(48,)).tolist()
    _assert_same_logits(fused, unfused, ids, decode_steps=8)
    # and the outside reference: HF transformers on the same (dequantized) weights, within
    # the packed path's bfloat16 rounding (as in test_packed.py)
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0].float()
    assert (fused.logits(ids) - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert describe(fused)["parameters"] == describe(unfused)["parameters"]
    assert describe(fused)["tensor_types"] == describe(unfused)["tensor_types"]
    assert fuse_projections(fused.model) == 0  # already fused: nothing left to do


# ----- the real models (slow) -----

@pytest.fixture(scope="module")
def smollm_pair(smollm_path):
    return lucidlm.load("smollm2-135m-instruct", progress=False), _load_unfused("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm_every_layer_is_fused(smollm_pair):
    fused, unfused = smollm_pair
    n = fused.config.n_layers
    assert _assert_views_match(fused.model, unfused.model) == 2 * n  # every layer's attention and MLP
    assert sum(isinstance(m, Int4Linear) for m in fused.model.modules()) == 4 * n  # qkv, o, gate_up, down
    assert sum(isinstance(m, Int4Linear) for m in unfused.model.modules()) == 7 * n
    # the fused layers own the weights, once: the same bytes in memory, and no other copies
    assert _buffer_bytes(fused.model) == _buffer_bytes(unfused.model)
    assert not any("q_proj" in k or "gate_proj" in k for k in fused.model.state_dict())


@pytest.mark.slow
def test_smollm_fused_logits_equal_unfused(smollm_pair):
    fused, unfused = smollm_pair
    ids = fused.tokenizer.encode(PASSAGE[:800])
    assert len(ids) >= DENSE_FROM_ROWS + 6
    _assert_same_logits(fused, unfused, ids, decode_steps=12)


@pytest.mark.slow
def test_smollm_fused_greedy_continuation_equals_unfused(smollm_pair):
    fused, unfused = smollm_pair
    ids = fused.tokenizer.encode("The capital of France is")
    runs = [list(generate_tokens(m.model, ids, make_sampler(SamplingParams()), 16, stop_ids=(), use_cache=True))
            for m in (fused, unfused)]
    assert [s.token_id for s in runs[0]] == [s.token_id for s in runs[1]]
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(*runs))
    assert fused.tokenizer.decode([s.token_id for s in runs[0]]).startswith(" Paris")


@pytest.mark.slow
def test_smollm_architecture_summary_unchanged(smollm_pair, lucid_smollm):
    fused, unfused = smollm_pair
    d_fused, d_unfused = describe(fused), describe(unfused)
    assert d_fused["parameters"] == d_unfused["parameters"] == describe(lucid_smollm)["parameters"]
    assert d_fused["tensor_types"] == d_unfused["tensor_types"]  # parameters and bytes per file type
    assert "RowSlice" in d_fused["module_tree"] and "qkv_proj" in d_fused["module_tree"]


@pytest.mark.slow
def test_gemma_fused_logits_equal_unfused(gemma_path):
    fused, unfused = lucidlm.load("gemma3-270m", progress=False), _load_unfused("gemma3-270m")
    # Gemma 3 270M's q/k/v/gate/up are Q5_0 (int8 per row), its o/down Q4_K or Q6_K:
    # the Int8Linear groups are fused
    assert isinstance(fused.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert _assert_views_match(fused.model, unfused.model) == 2 * fused.config.n_layers
    assert _buffer_bytes(fused.model) == _buffer_bytes(unfused.model)
    ids = fused.tokenizer.encode(PASSAGE[:800])
    assert len(ids) >= DENSE_FROM_ROWS + 6
    _assert_same_logits(fused, unfused, ids, decode_steps=8)
    d_fused, d_unfused = describe(fused), describe(unfused)
    assert d_fused["parameters"] == d_unfused["parameters"]
    assert d_fused["tensor_types"] == d_unfused["tensor_types"]


# ----- dense layers (`dense=True`: what compile_decode does on a GPU) -----

def test_dense_fusion_matches_transformers():
    # A float32 tiny Llama: fused, its prefill and cached decode still give HF's logits (one
    # matmul over stacked rows sums in the same order per output; observed max |Δ| ~1e-6).
    from tiny_llama import tiny_llama_pair

    from lucidlm.introspect.architecture import weight_sizes

    hf, ours = tiny_llama_pair(3)
    q_weight = ours.layers[0].self_attn.q_proj.weight.detach().clone()
    n_params = sum(p.numel() for p in ours.parameters())
    sizes = weight_sizes(ours)
    assert fuse_projections(ours, dense=True) == 2 * ours.config.n_layers
    assert weight_sizes(ours) == sizes  # the summary still lists q_proj, k_proj, ... once each
    attn, mlp = ours.layers[0].self_attn, ours.layers[0].mlp
    assert isinstance(attn.q_proj, RowSlice) and isinstance(attn.qkv_proj, torch.nn.Linear)
    assert isinstance(mlp.gate_proj, RowSlice) and isinstance(mlp.gate_up_proj, torch.nn.Linear)
    assert torch.equal(attn.q_proj.weight, q_weight)  # the old name is a view of the fused rows
    assert sum(p.numel() for p in ours.parameters()) == n_params  # stacked, nothing duplicated
    ids = [5, 17, 33, 2, 90, 41, 7, 60]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0]
        cache = ours.new_cache(1, len(ids))
        steps = [ours(torch.tensor([ids[:5]]), cache)[0]] + [ours(torch.tensor([[t]]), cache)[0] for t in ids[5:]]
    torch.testing.assert_close(torch.cat(steps), expected, atol=1e-4, rtol=0)


def test_dense_fusion_keeps_biases():
    # Qwen2-style q/k/v biases: the fused layer's output is the three layers' side by side.
    from lucidlm.models.llama import Attention, LlamaConfig

    torch.manual_seed(0)
    attn = Attention(LlamaConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=8,
                                 context_length=8, attention_bias=True), 0)
    x = torch.randn(2, 3, 32)
    expected = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    fuse_projections(attn, dense=True)
    torch.testing.assert_close(attn.qkv_proj(x), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.k_proj.bias, attn.qkv_proj.bias[32:48])
