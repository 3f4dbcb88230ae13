"""Loading Hugging Face checkpoint directories: sharded files, name variants, and every kind of
bad input failing with a one-line `LucidError` that names the problem."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lucidlm
from lucidlm.errors import LucidError, ModelFileError, UnsupportedError
from lucidlm.loading.hf import load_hf
from tiny_hf import random_tokens, reference_logits, save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen2 checkpoint (biases make it the family with the most tensor kinds) and its reference."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("qwen2")
    hf = save_tiny(cfg, path)
    return path, hf


@pytest.fixture
def copy(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir[0], tmp_path / "model")
    return tmp_path / "model"


def _error(path, kind=LucidError) -> str:
    with pytest.raises(kind) as info:
        load_hf(path, progress=False)
    message = str(info.value)
    assert "\n" not in message
    return message


def _rewrite_tensors(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_sharded_checkpoint_loads_like_the_single_file(tiny_dir, tmp_path):
    path, hf = tiny_dir
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    tokens = random_tokens(1, 10)
    with torch.inference_mode():
        sharded = load_hf(tmp_path, progress=False).model(tokens)
    torch.testing.assert_close(sharded, reference_logits(hf, tokens), atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_is_read_as_float32(copy):
    _rewrite_tensors(copy, lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    model = load_hf(copy, progress=False).model
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_family_from_architectures_when_model_type_is_absent(copy):
    config = json.loads((copy / "config.json").read_text())
    del config["model_type"]
    (copy / "config.json").write_text(json.dumps(config))
    assert load_hf(copy, progress=False).family == "qwen2"


def test_tied_config_ignores_a_saved_head_copy(copy):
    _edit_config(copy, tie_word_embeddings=True)  # the file still has lm_head.weight: unused
    model = load_hf(copy, progress=False).model
    assert model.lm_head.weight is model.embed_tokens.weight


def test_missing_tensor(copy):
    _rewrite_tensors(copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    message = _error(copy, ModelFileError)
    assert "lacks tensors model.layers.1.self_attn.k_proj.bias" in message


def test_wrong_shape(copy):
    _rewrite_tensors(copy, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(47, 32)}))
    message = _error(copy, ModelFileError)
    assert "'model.layers.0.mlp.up_proj.weight' has shape (47, 32), expected (48, 32)" in message


def test_config_disagreeing_with_the_tensors(copy):
    _edit_config(copy, num_hidden_layers=3)
    assert "lacks tensors model.layers.2." in _error(copy, ModelFileError)


def test_unexpected_tensor(copy):
    _rewrite_tensors(copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    assert "does not use: model.layers.0.mlp.extra.weight" in _error(copy, ModelFileError)


def test_integer_tensor_is_refused(copy):
    _rewrite_tensors(copy, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int8)}))
    assert "'model.norm.weight' has dtype I8" in _error(copy, UnsupportedError)


def test_unknown_model_type(copy):
    _edit_config(copy, model_type="falcon", architectures=["FalconForCausalLM"])
    message = _error(copy, UnsupportedError)
    assert "model_type 'falcon' is not supported" in message
    assert "gpt2, llama, mistral, mixtral, phi3, qwen2, qwen3" in message


def test_unsupported_rope_scaling(copy):
    _edit_config(copy, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert "RoPE scaling 'yarn' is not supported" in _error(copy, UnsupportedError)


def test_missing_config(copy):
    (copy / "config.json").unlink()
    assert "no config.json" in _error(copy, ModelFileError)


def test_missing_config_key(copy):
    config = json.loads((copy / "config.json").read_text())
    del config["hidden_size"]
    (copy / "config.json").write_text(json.dumps(config))
    assert "lacks 'hidden_size'" in _error(copy, ModelFileError)


def test_inconsistent_config(copy):
    _edit_config(copy, num_key_value_heads=3)
    assert "4 query heads cannot be grouped over 3 KV heads" in _error(copy, ModelFileError)


def test_corrupt_safetensors(copy):
    (copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    assert "not a readable safetensors file" in _error(copy, ModelFileError)


def test_shard_listed_in_index_but_missing(tiny_dir, tmp_path):
    tiny_dir[1].save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert f"shard {shards[-1].name} listed in model.safetensors.index.json is missing" in _error(tmp_path)


class _Trap:
    """Unpickling this object would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoint_is_refused_and_never_opened(copy, tmp_path):
    (copy / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    message = _error(copy, UnsupportedError)
    assert "pytorch_model.bin, a pickle file" in message and "safetensors" in message
    assert not marker.exists()


def test_no_weights_at_all(copy):
    (copy / "model.safetensors").unlink()
    assert "no weights found" in _error(copy, ModelFileError)


def test_not_a_directory(tmp_path):
    assert "not a directory" in _error(tmp_path / "absent", ModelFileError)


def test_old_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """openai-community/gpt2's file: keys without `transformer.`, causal-mask buffers `attn.bias`."""
    from transformers import GPT2Config

    hf = save_tiny(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=16), tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tokens = random_tokens(1, 10)
    with torch.inference_mode():
        actual = load_hf(tmp_path, progress=False).model(tokens)
    torch.testing.assert_close(actual, reference_logits(hf, tokens), atol=1e-4, rtol=0)


def test_lucidlm_load_without_tokenizer_json(copy):
    with pytest.raises(ModelFileError, match="no tokenizer.json"):
        lucidlm.load(str(copy), progress=False)


def test_tokenizer_larger_than_the_model(copy):
    _train_byte_level_bpe(copy, vocab_size=290)  # the model has 128 rows
    with pytest.raises(ModelFileError, match="tokenizer has 2[0-9][0-9] tokens but the model's vocabulary size is 128"):
        lucidlm.load(str(copy), progress=False)


def _train_byte_level_bpe(path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the cat sat on the mat", "the dog ate the cat's dinner"] * 20, trainer)
    tokenizer.save(str(path / "tokenizer.json"))


def test_lucidlm_load_of_a_directory_generates_like_the_reference(tmp_path):
    """End to end: `lucidlm.load(directory)` (GPT-2 + byte-level BPE tokenizer.json) continues a
    prompt as transformers does, text in, text out."""
    from transformers import GPT2Config, PreTrainedTokenizerFast

    _train_byte_level_bpe(tmp_path, vocab_size=290)
    reference_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    # An embedding table larger than the vocabulary, as in many checkpoints (padded for speed).
    hf = save_tiny(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=None,
                              eos_token_id=None), tmp_path)
    with torch.no_grad():  # logit exactly 0 (never the greedy choice) for <|endoftext|> and the padding rows
        hf.transformer.wte.weight[0] = 0
        hf.transformer.wte.weight[len(reference_tokenizer):] = 0
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = lucidlm.load(str(tmp_path), progress=False)
    prompt = "the cat sat"
    ids = reference_tokenizer(prompt).input_ids
    assert model.tokenizer.encode(prompt) == ids
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = reference_tokenizer.decode(out[0, len(ids):])
    assert model.generate(prompt, max_new_tokens=6) == expected


# ----- config values no model can be built from: a ModelFileError naming config.json -----

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
FAMILY_CONFIGS = {  # config.json of a tiny model of each family (the values are read before any tensor)
    "llama": dict(model_type="llama", **SIZES),
    "mistral": dict(model_type="mistral", **SIZES),
    "mixtral": dict(model_type="mixtral", **SIZES),
    "qwen2": dict(model_type="qwen2", **SIZES),
    "qwen3": dict(model_type="qwen3", **SIZES),
    "phi3": dict(model_type="phi3", **SIZES),
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=32),
    "bert": dict(model_type="bert", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=32),
}
HEADS = {"gpt2": "n_head"}
LAYERS = {"gpt2": "n_layer"}


def _config_error(tmp_path, family, **changes) -> str:
    (tmp_path / "config.json").write_text(json.dumps({**FAMILY_CONFIGS[family], **changes}))
    message = _error(tmp_path, ModelFileError)
    assert "config.json" in message
    return message


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_zero_or_negative_sizes(tmp_path, family):
    """Were ZeroDivisionErrors (0 heads) or RuntimeErrors from building the model (negative sizes)."""
    heads, layers = HEADS.get(family, "num_attention_heads"), LAYERS.get(family, "num_hidden_layers")
    assert "n_heads must be a positive integer, got 0" in _config_error(tmp_path, family, **{heads: 0})
    assert "vocab_size must be a positive integer, got -5" in _config_error(tmp_path, family, vocab_size=-5)
    assert "n_layers must be a positive integer, got 0" in _config_error(tmp_path, family, **{layers: 0})


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3"])
def test_zero_kv_heads(tmp_path, family):
    assert "n_kv_heads must be a positive integer, got 0" in _config_error(tmp_path, family, num_key_value_heads=0)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_width_not_a_multiple_of_the_heads(tmp_path, family):
    """BERT with 7 heads over a width of 384 used to load, then fail at its first forward pass."""
    heads = HEADS.get(family, "num_attention_heads")
    changes = {heads: 7, "num_key_value_heads": 7} if family not in ("gpt2", "bert") else {heads: 7}
    assert "d_model 32 is not a multiple of 7 heads" in _config_error(tmp_path, family, **changes)


@pytest.mark.parametrize(("changes", "fragment"), [
    (dict(rope_theta=float("nan")), "rope_base must be a finite positive number, got nan"),
    (dict(rms_norm_eps=-1.0), "norm_eps must be a finite positive number, got -1.0"),
    (dict(head_dim=7), "head_dim 7 is odd"),
    (dict(head_dim="8"), "head_dim must be a positive integer, got '8'"),
    (dict(sliding_window=-4), "sliding_window must be a positive integer, got -4"),
])
def test_unusable_decoder_values(tmp_path, changes, fragment):
    assert fragment in _config_error(tmp_path, "mistral", **changes)


def test_unusable_expert_counts(tmp_path):
    assert "n_experts must be a positive integer, got 0" in _config_error(tmp_path, "mixtral", num_local_experts=0)
