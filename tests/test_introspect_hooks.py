"""Hook points on a tiny random Llama, against Hugging Face transformers and a hand-written forward pass.

- captured attention patterns equal HF's `output_attentions` (eager attention), captured
  residual streams its `output_hidden_states` (hidden_states[i] is block i's input; the
  last one is taken after the final norm);
- every captured tensor has the shape documented in HOOK_SITES;
- editing through `run_with_hooks` (zeroing one head's hook_z) equals the same edit in an
  explicit forward pass written out below; a hook that changes nothing changes nothing;
- listeners never outlive the pass; bad names and bad replacements are clear errors;
- with nobody listening, no (B, H, T, S) attention-weight tensor is ever built.
"""

import pytest
import torch
from torch.profiler import profile
from tiny_llama import TINY, tiny_llama_pair

from lucidlm.errors import InvalidArgumentError
from lucidlm.introspect import (HOOK_SITES, hook_names, hook_points, hooks_attached, run_with_cache,
                                run_with_hooks)

B, T = 2, 11
L, H, H_KV, C = TINY["n_layers"], TINY["n_heads"], TINY["n_kv_heads"], TINY["d_model"]
D = C // H


@pytest.fixture(scope="module")
def pair():
    return tiny_llama_pair()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(pair, tokens):
    hf, _ = pair
    with torch.no_grad():
        return hf(tokens, output_attentions=True, output_hidden_states=True)


@pytest.fixture(scope="module")
def captured(pair, tokens):
    return run_with_cache(pair[1], tokens)


def test_names_follow_transformer_lens_in_forward_order(pair):
    names = hook_names(pair[1])
    # Llama has every site but GPT-2's position embedding and the MoE router's.
    per_block = [s for s in HOOK_SITES if s not in ("hook_embed", "hook_pos_embed", "hook_final_norm")
                 and not s.startswith("moe.")]
    assert names == ["hook_embed", *[f"blocks.{i}.{s}" for i in range(L) for s in per_block], "hook_final_norm"]
    assert {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z", "hook_resid_pre",
            "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"} <= set(per_block)


def test_hook_points_stay_out_of_module_tree_and_state_dict(pair):
    _, ours = pair
    assert "hook" not in repr(ours) and not any("hook" in k for k in ours.state_dict())


def test_captured_shapes_are_the_documented_ones(captured):
    _, cache = captured
    letters = {"B": B, "T": T, "S": T, "H": H, "H_kv": H_KV, "D": D, "C": C}
    for name, tensor in cache.items():
        site = name.split(".", 2)[2] if name.startswith("blocks.") else name
        documented = HOOK_SITES[site][0].strip("()").split(", ")
        assert tuple(tensor.shape) == tuple(letters[x] for x in documented), name


def test_patterns_equal_reference_attentions(captured, reference):
    _, cache = captured
    assert len(reference.attentions) == L
    for i, expected in enumerate(reference.attentions):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], expected, atol=1e-5, rtol=0)


def test_residual_streams_equal_reference_hidden_states(captured, reference):
    logits, cache = captured
    hidden = reference.hidden_states
    assert len(hidden) == L + 1
    torch.testing.assert_close(cache["hook_embed"], hidden[0], atol=0, rtol=0)
    for i in range(L):
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_pre"], hidden[i], atol=1e-4, rtol=1e-5)
    for i in range(L - 1):  # one block's output is the next one's input
        assert torch.equal(cache[f"blocks.{i}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"])
    # HF's last hidden state is after the final norm: our hook_final_norm, not resid_post.
    torch.testing.assert_close(cache["hook_final_norm"], hidden[L], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits, reference.logits, atol=1e-4, rtol=0)


def test_residual_decomposes_into_attention_and_mlp_outputs(captured):
    _, cache = captured
    for i in range(L):
        pre, mid, post = (cache[f"blocks.{i}.hook_resid_{s}"] for s in ("pre", "mid", "post"))
        assert torch.equal(mid, pre + cache[f"blocks.{i}.hook_attn_out"])
        assert torch.equal(post, mid + cache[f"blocks.{i}.hook_mlp_out"])


def _rope(x, base=TINY["rope_base"]):
    """Rotate-half RoPE on (B, heads, T, D), written out independently of lucidlm."""
    d = x.shape[-1]
    angles = torch.arange(x.shape[2], dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2) / d)
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


def explicit_forward(model, tokens, zero=None):
    """The whole Llama forward pass, step by step; zero=(layer, head) zeroes that head's output."""
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TINY["norm_eps"]) * w

    x = model.embed_tokens.weight[tokens]  # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, block in enumerate(model.layers):
        a = block.self_attn
        h = norm(x, block.input_layernorm.weight)
        q = _rope((h @ a.q_proj.weight.T).view(B, T, H, D).transpose(1, 2))
        k = _rope((h @ a.k_proj.weight.T).view(B, T, H_KV, D).transpose(1, 2)).repeat_interleave(H // H_KV, 1)
        v = (h @ a.v_proj.weight.T).view(B, T, H_KV, D).transpose(1, 2).repeat_interleave(H // H_KV, 1)
        weights = ((q @ k.transpose(-1, -2)) / D**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        z = weights @ v  # (B, H, T, D)
        if zero is not None and zero[0] == i:
            z[:, zero[1]] = 0
        x = x + z.transpose(1, 2).reshape(B, T, C) @ a.o_proj.weight.T
        h = norm(x, block.post_attention_layernorm.weight)
        mlp = block.mlp
        x = x + (torch.nn.functional.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return norm(x, model.norm.weight) @ model.lm_head.weight.T


@torch.no_grad()
def test_zeroing_a_head_equals_the_same_edit_by_hand(pair, tokens):
    _, ours = pair
    layer, head = 1, 2

    def zero_head(z, name):
        z = z.clone()
        z[:, head] = 0  # z: (B, H, T, D)
        return z

    edited = run_with_hooks(ours, tokens, {f"blocks.{layer}.attn.hook_z": zero_head})
    torch.testing.assert_close(explicit_forward(ours, tokens), ours(tokens), atol=1e-4, rtol=0)
    expected = explicit_forward(ours, tokens, zero=(layer, head))
    torch.testing.assert_close(edited, expected, atol=1e-4, rtol=0)
    assert (edited - ours(tokens)).abs().max() > 0.1  # the edit mattered


@torch.no_grad()
def test_hooks_that_change_nothing_change_nothing(pair, tokens):
    _, ours = pair
    plain = ours(tokens)
    names = [n for n in hook_names(ours) if not n.endswith("hook_pattern")]  # pattern: explicit path
    reads = run_with_hooks(ours, tokens, {n: (lambda x, name: None) for n in names})
    identity = run_with_hooks(ours, tokens, {n: (lambda x, name: x) for n in names})
    assert torch.equal(reads, plain) and torch.equal(identity, plain)
    with_pattern = run_with_hooks(ours, tokens, {"blocks.0.attn.hook_pattern": lambda x, name: None})
    torch.testing.assert_close(with_pattern, plain, atol=1e-4, rtol=0)


def test_listeners_are_removed_even_when_a_hook_raises(pair, tokens):
    _, ours = pair

    def fail(x, name):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_with_hooks(ours, tokens, {"blocks.0.hook_resid_mid": fail, "blocks.2.attn.hook_pattern": fail})
    assert not any(p.active for p in hook_points(ours).values())


@pytest.mark.parametrize("name", ["blocks.3.hook_resid_post", "blocks.0.hook_resid", "attn.hook_z", ""])
def test_unknown_hook_name_is_a_clear_error(pair, tokens, name):
    _, ours = pair
    for call in (lambda: run_with_hooks(ours, tokens, {name: lambda x, n: None}),
                 lambda: run_with_cache(ours, tokens, names=[name])):
        with pytest.raises(InvalidArgumentError, match=f"unknown hook point '{name}'.*blocks 0-{L - 1}"):
            call()
    assert not any(p.active for p in hook_points(ours).values())


def test_replacement_of_the_wrong_shape_is_a_clear_error(pair, tokens):
    _, ours = pair
    with pytest.raises(InvalidArgumentError, match=r"'blocks.1.attn.hook_z' returned shape \(2, 4, 11\)"):
        run_with_hooks(ours, tokens, {"blocks.1.attn.hook_z": lambda z, name: z[..., 0]})


def test_run_with_cache_name_selection(pair, tokens):
    _, ours = pair
    _, one = run_with_cache(ours, tokens, names="hook_embed")
    _, resid = run_with_cache(ours, tokens, names=lambda n: n.endswith("hook_resid_post"))
    assert list(one) == ["hook_embed"]
    assert list(resid) == [f"blocks.{i}.hook_resid_post" for i in range(L)]
    assert resid.stack_layers("hook_resid_post").shape == (L, B, T, C)
    with pytest.raises(InvalidArgumentError, match="'hook_final_norm' was not captured"):
        resid["hook_final_norm"]


def _attention_sized_inputs(model, tokens, hooks) -> int:
    """How many ops take a (B, H, T, T) tensor (attention scores or weights) as input."""
    with profile(record_shapes=True) as prof, hooks_attached(model, hooks), torch.inference_mode():
        model(tokens)
    return sum(list(shape) == [B, H, T, T] for e in prof.events() for shape in e.input_shapes)


def test_no_attention_weights_are_built_when_nobody_listens(pair, tokens):
    _, ours = pair
    assert _attention_sized_inputs(ours, tokens, {}) == 0
    # Every hook but the pattern listened to: still the fused kernel.
    names = [n for n in hook_names(ours) if not n.endswith("hook_pattern")]
    assert _attention_sized_inputs(ours, tokens, {n: (lambda x, name: None) for n in names}) == 0
    # The measurement can see them: listening to one layer's pattern builds that layer's weights.
    assert _attention_sized_inputs(ours, tokens, {"blocks.1.attn.hook_pattern": lambda x, name: None}) > 0


@torch.inference_mode()
def test_hooks_see_cached_decode_steps(pair, tokens):
    """During cached decoding T counts new positions and S all positions so far."""
    _, ours = pair
    prompt = tokens[:1]
    _, full = run_with_cache(ours, prompt, names="blocks.2.attn.hook_pattern")
    seen = []
    cache = ours.new_cache(1, T)
    with hooks_attached(ours, {"blocks.2.attn.hook_pattern": lambda x, name: seen.append(x)}):
        ours(prompt[:, :-1], cache)
        ours(prompt[:, -1:], cache)
    assert seen[1].shape == (1, H, 1, T)
    torch.testing.assert_close(seen[1][0, :, 0], full["blocks.2.attn.hook_pattern"][0, :, -1], atol=1e-5, rtol=0)
