"""Architecture cards: built on the meta device, parameter counts equal transformers' for the
same published configurations, KV-cache sizes by hand, and `lucid inspect-card`."""

import pytest
import torch

from lucidlm.cli import main
from lucidlm.errors import InvalidArgumentError
from lucidlm.models.cards import CARDS, build_card, count_parameters


def _hf_config(name):
    import transformers as t

    if name == "phi-3-mini-4k-instruct":
        return t.Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                            sliding_window=2047, tie_word_embeddings=False, pad_token_id=32000)
    if name == "llama-3-8b":
        return t.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                             tie_word_embeddings=False)
    if name == "mixtral-8x7b":
        return t.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                               num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    if name == "gpt2":
        return t.GPT2Config()
    assert name == "bert-base-cased"
    return t.BertConfig(vocab_size=28996)


def _hf_parameter_count(name) -> int:
    import transformers as t

    cfg = _hf_config(name)
    with torch.device("meta"):
        if name == "bert-base-cased":
            model = t.BertModel(cfg, add_pooling_layer=False)  # our Bert is the encoder without the pooler
        else:
            model = t.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(CARDS))
def test_parameter_count_equals_reference(name):
    model = build_card(name)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    total, _ = count_parameters(model)
    assert total == _hf_parameter_count(name)


def test_mixtral_total_and_active_parameters():
    total, active = count_parameters(build_card("mixtral-8x7b"))
    assert round(total / 1e9, 1) == 46.7 and round(active / 1e9, 1) == 12.9
    # Per layer 6 of the 8 experts (3 matrices of 4096 x 14336 each) sit idle for a given token.
    assert total - active == 32 * 6 * 3 * 4096 * 14336


def test_dense_models_use_every_parameter():
    total, active = count_parameters(build_card("llama-3-8b"))
    assert total == active == 8_030_261_248


@pytest.mark.parametrize("name, kv_bytes", [
    ("llama-3-8b", 2 * 32 * 8 * 128 * 4),  # K and V x layers x KV heads x head_dim x float32
    ("mixtral-8x7b", 2 * 32 * 8 * 128 * 4),
    ("phi-3-mini-4k-instruct", 2 * 32 * 32 * 96 * 4),
    ("gpt2", 2 * 12 * 12 * 64 * 4),
])
def test_kv_cache_bytes_per_token(name, kv_bytes):
    assert build_card(name).config.kv_bytes_per_token == kv_bytes


def test_unknown_card_is_a_clear_error():
    with pytest.raises(InvalidArgumentError, match="unknown card 'gpt5'.*mixtral-8x7b"):
        build_card("gpt5")


def test_inspect_card_command(capsys):
    assert main(["inspect-card", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704 (46.7B) total" in out and "(12.9B)" in out
    assert "0-31: 32 x Block" in out and "0-7: 8 x Expert" in out and "w1: Linear  weight (14336, 4096)" in out
    assert "KV cache per token: 262,144 bytes in float32" in out


def test_inspect_card_lists_cards_and_shows_tied_head(capsys):
    assert main(["inspect-card"]) == 0
    assert set(CARDS) <= set(line.split()[0] for line in capsys.readouterr().out.splitlines())
    assert main(["inspect-card", "gpt2"]) == 0
    assert "lm_head: Linear  weight = wte.weight (tied)" in capsys.readouterr().out
    assert main(["inspect-card", "gpt5"]) == 2


def test_lucid_inspect_prints_a_card_like_the_seed(capsys):
    """Seed 000 prints Phi3ForCausalLM with fused qkv_proj and gate_up_proj; `lucid inspect` does too."""
    from lucidlm.cli import main

    assert main(["inspect", "phi-3-mini-4k-instruct"]) == 0
    out = capsys.readouterr().out
    assert "qkv_proj" in out and "gate_up_proj" in out and "3,821,079,552" in out
