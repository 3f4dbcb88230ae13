"""Reading GGUF files and loading models from them, against outside references.

- Header parsing: our `GGUFFile` against the `gguf` package's `GGUFReader`, on a tiny
  file written here with `gguf.GGUFWriter` and on the real SmolLM2 file.
- Loading: a tiny random Llama is built in Hugging Face transformers, its weights are
  written to GGUF the way llama.cpp's converter writes them (q/k rows permuted for its
  RoPE, names `blk.N.*`), and `lucidlm.load` of that file must give the HF model's logits.
- Bad input: every problem is a `LucidError` subclass with a one-line message.

The tiny-file writers here are also used by test_cli.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import lucidlm
from lucidlm.errors import LucidError, ModelFileError, UnsupportedError
from lucidlm.loading.gguf import GGUFFile

# The tiny model's sizes.
TINY = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, context_length=256,
            rope_base=50000.0, norm_eps=1e-6)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGE_WORDS = ["the", "hello", "world", "capital", "France", "Paris", "is", "of"]


# ----- writing tiny GGUF files -----

def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> a printable character (index b)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types): 3 specials, 256 byte tokens, then merged words."""
    tokens = SPECIAL_TOKENS + gpt2_byte_alphabet()
    types = [3] * len(SPECIAL_TOKENS) + [1] * 256
    merges = []
    for word in MERGE_WORDS:
        spelled = "Ġ" + word  # "Ġ" spells the space byte
        for end in range(2, len(spelled) + 1):
            left, right = spelled[: end - 1], spelled[end - 1]
            if spelled[:end] not in tokens:
                merges.append(f"{left} {right}")
                tokens.append(spelled[:end])
                types.append(1)
    return tokens, merges, types


VOCAB_SIZE = len(tiny_vocab()[0])


def tiny_metadata(arch: str = "llama", **sizes) -> dict[str, tuple]:
    """key -> (value, value type[, item type]) for a tiny Llama with a GPT-2 style tokenizer."""
    s = {**TINY, **sizes}
    tokens, merges, types = tiny_vocab()
    return {
        "general.architecture": (arch, V.STRING),
        "general.name": ("tiny-test-llama", V.STRING),
        f"{arch}.block_count": (s["n_layers"], V.UINT32),
        f"{arch}.context_length": (s["context_length"], V.UINT32),
        f"{arch}.embedding_length": (s["d_model"], V.UINT32),
        f"{arch}.feed_forward_length": (s["d_ff"], V.UINT32),
        f"{arch}.attention.head_count": (s["n_heads"], V.UINT32),
        f"{arch}.attention.head_count_kv": (s["n_kv_heads"], V.UINT32),
        f"{arch}.rope.freq_base": (s["rope_base"], V.FLOAT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (s["norm_eps"], V.FLOAT32),
        f"{arch}.rope.dimension_count": (s["d_model"] // max(s["n_heads"], 1), V.UINT32),  # (files with 0 heads too)
        "general.file_type": (0, V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("default", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (0, V.UINT32),
        "tokenizer.ggml.eos_token_id": (0, V.UINT32),
        "tokenizer.ggml.add_bos_token": (False, V.BOOL),
        "tokenizer.chat_template": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                    "<|im_end|>\n{% endfor %}<|im_start|>assistant\n", V.STRING),
        # Values of the other types, so the parser sees every scalar kind.
        "test.int8": (-5, V.INT8), "test.uint16": (65535, V.UINT16), "test.int16": (-300, V.INT16),
        "test.int32": (-(2**31), V.INT32), "test.uint64": (2**64 - 1, V.UINT64), "test.int64": (-(2**63), V.INT64),
        "test.float64": (math.pi, V.FLOAT64), "test.uint8": (255, V.UINT8), "test.bool": (True, V.BOOL),
        "test.unicode": ("héllo wörld ✓ 𝄞", V.STRING), "test.empty": ("", V.STRING),
        "test.floats": ([0.5, -1.25, 3.0e38], V.ARRAY, V.FLOAT32),
    }


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (rows only, so it also works on the
    rows of already-quantized bytes): w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_tiny_tensors(seed: int = 0, **sizes) -> dict[str, np.ndarray]:
    """GGUF name -> float32 weights (PyTorch shape) for a random tiny Llama with untied output."""
    s = {**TINY, **sizes}
    rng = np.random.default_rng(seed)
    hd = s["d_model"] // s["n_heads"]

    def mat(out, inp):
        return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": rng.standard_normal((VOCAB_SIZE, s["d_model"])).astype(np.float32),
         "output_norm.weight": norm(s["d_model"]), "output.weight": mat(VOCAB_SIZE, s["d_model"])}
    for i in range(s["n_layers"]):
        t |= {f"blk.{i}.attn_norm.weight": norm(s["d_model"]),
              f"blk.{i}.attn_q.weight": mat(s["n_heads"] * hd, s["d_model"]),
              f"blk.{i}.attn_k.weight": mat(s["n_kv_heads"] * hd, s["d_model"]),
              f"blk.{i}.attn_v.weight": mat(s["n_kv_heads"] * hd, s["d_model"]),
              f"blk.{i}.attn_output.weight": mat(s["d_model"], s["n_heads"] * hd),
              f"blk.{i}.ffn_norm.weight": norm(s["d_model"]),
              f"blk.{i}.ffn_gate.weight": mat(s["d_ff"], s["d_model"]),
              f"blk.{i}.ffn_up.weight": mat(s["d_ff"], s["d_model"]),
              f"blk.{i}.ffn_down.weight": mat(s["d_model"], s["d_ff"])}
    return t


def write_gguf(path: Path, metadata: dict[str, tuple], tensors: dict[str, np.ndarray | tuple]) -> Path:
    """Write a GGUF file. A tensor is a float32/float16 array, or (uint8 bytes, raw ggml type)."""
    arch = metadata["general.architecture"][0]
    writer = gguf.GGUFWriter(str(path), arch)  # writes general.architecture itself
    for key, (value, vtype, *item) in metadata.items():
        if key != "general.architecture":
            writer.add_key_value(key, value, vtype, sub_type=item[0] if item else None)
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            raw, raw_type = tensor
            writer.add_tensor(name, raw, raw_dtype=raw_type)
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def write_tiny_model(path: Path, seed: int = 0, context_length: int = TINY["context_length"]) -> Path:
    """A loadable tiny Llama with random weights (as llama.cpp would store them)."""
    return write_gguf(path, tiny_metadata(context_length=context_length), random_tiny_tensors(seed))


# ----- header parsing vs gguf.GGUFReader -----

def assert_same_as_reader(path: Path, full_arrays: bool = True) -> None:
    ours = GGUFFile(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        value = ours.metadata[key]
        expected = field.contents()
        if isinstance(expected, list) and len(expected) > 1000 and not full_arrays:
            assert len(value) == len(expected), key
            for i in (0, 1, len(expected) // 3, len(expected) // 2, len(expected) - 1):
                assert value[i] == expected[i], (key, i)
            continue
        assert value == expected, key
        assert type(value) is type(expected), key  # bool stays bool, int int, str str
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == int(t.tensor_type) and info.type_name == t.tensor_type.name, t.name
        assert info.dims == tuple(int(d) for d in t.shape), t.name
        assert info.shape == tuple(reversed(info.dims))
        assert info.n_elements == t.n_elements, t.name
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


def test_tiny_header_matches_gguf_reader(tmp_path):
    tensors = random_tiny_tensors()
    # A few encodings besides F32, so types, sizes and offsets vary.
    tensors["blk.0.ffn_up.weight"] = (gguf.quants.quantize(tensors["blk.0.ffn_up.weight"], Q.Q4_1), Q.Q4_1)
    tensors["blk.0.ffn_gate.weight"] = (gguf.quants.quantize(tensors["blk.0.ffn_gate.weight"], Q.Q8_0), Q.Q8_0)
    tensors["blk.1.attn_v.weight"] = tensors["blk.1.attn_v.weight"].astype(np.float16)
    tensors["blk.1.attn_output.weight"] = (gguf.quants.quantize(tensors["blk.1.attn_output.weight"], Q.BF16), Q.BF16)
    assert_same_as_reader(write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors))


def test_real_model_header_matches_gguf_reader(smollm_path):
    assert_same_as_reader(smollm_path, full_arrays=True)


# ----- loading: our logits vs Hugging Face transformers on the same weights -----

def hf_llama_and_gguf_tensors(tie: bool, encoding: Q, seed: int = 0):
    """A random HF LlamaForCausalLM and its weights as GGUF tensors, llama.cpp style.

    With a quantized `encoding`, the matrices are stored quantized and the HF model's weights
    are replaced by gguf's dequantization of those bytes, so both sides hold equal values.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    s = TINY
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=s["d_model"], intermediate_size=s["d_ff"],
                      num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                      num_key_value_heads=s["n_kv_heads"], max_position_embeddings=s["context_length"],
                      rms_norm_eps=s["norm_eps"], tie_word_embeddings=tie,
                      rope_parameters={"rope_type": "default", "rope_theta": s["rope_base"]})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    assert model.config.rope_parameters["rope_theta"] == s["rope_base"]
    with torch.no_grad():  # weights big enough that every part of the network matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))

    hf_to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}
    for i in range(s["n_layers"]):
        for hf, g in [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                      ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                      ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
                      ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
            hf_to_gguf[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"

    params = dict(model.named_parameters())
    tensors = {}
    for hf_name, g_name in hf_to_gguf.items():
        if tie and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        w = params[hf_name].detach().numpy()
        stored = w
        if w.ndim == 2 and encoding != Q.F32:
            stored = gguf.quants.quantize(w, encoding)  # (rows, bytes per row) for block types
            with torch.no_grad():
                params[hf_name].copy_(torch.from_numpy(gguf.quants.dequantize(stored, encoding).reshape(w.shape)))
        # The permutation moves whole rows; quantization works within rows, so permuting
        # the rows of the quantized bytes equals quantizing the permuted weights.
        if g_name.endswith("attn_q.weight"):
            stored = permute_for_llama_cpp(stored, s["n_heads"])
        elif g_name.endswith("attn_k.weight"):
            stored = permute_for_llama_cpp(stored, s["n_kv_heads"])
        tensors[g_name] = (stored, encoding) if stored.dtype == np.uint8 else np.ascontiguousarray(stored)
    return model, tensors


@pytest.mark.parametrize(("tie", "encoding"), [(False, Q.F32), (True, Q.F32), (False, Q.Q8_0), (True, Q.Q4_1)],
                         ids=["untied-f32", "tied-f32", "untied-q8_0", "tied-q4_1"])
def test_tiny_model_logits_match_transformers(tmp_path, tie, encoding):
    hf_model, tensors = hf_llama_and_gguf_tensors(tie, encoding)
    path = write_gguf(tmp_path / "tiny.gguf", tiny_metadata(), tensors)
    model = lucidlm.load(str(path), progress=False, dtype="float32")

    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.context_length) == (
        VOCAB_SIZE, 64, 2, 4, 2, 128, 256)
    assert cfg.tie_embeddings == tie and cfg.rope_base == TINY["rope_base"]
    assert model.tokenizer.vocab_size == VOCAB_SIZE
    expected_type = "F32" if encoding == Q.F32 else encoding.name
    assert model.tensor_types["layers.0.self_attn.q_proj.weight"] == expected_type

    ids = torch.from_numpy(np.random.default_rng(1).integers(0, VOCAB_SIZE, size=(2, 48)))
    with torch.inference_mode():
        expected = hf_model(ids).logits.float()
    actual = torch.stack([model.logits(row.tolist()) for row in ids])
    assert actual.shape == expected.shape == (2, 48, VOCAB_SIZE)
    assert expected.std() > 0.5  # the comparison is not between near-zero numbers
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


# ----- bad input: each a LucidError with a clear one-line message -----

def _raises(kind: type[LucidError], load_arg, *fragments: str) -> str:
    with pytest.raises(kind) as info:
        lucidlm.load(str(load_arg), progress=False)
    message = str(info.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def test_tiny_model_loads_and_runs(tiny_file):
    model = lucidlm.load(str(tiny_file), progress=False)
    ids = model.tokenizer.encode("hello world, the capital of France is Paris")
    assert model.tokenizer.decode(ids) == "hello world, the capital of France is Paris"
    assert model.tokenizer.piece_to_id("Ġcapital") in ids
    assert model.logits(ids).shape == (len(ids), VOCAB_SIZE)


def test_missing_file(tmp_path):
    _raises(ModelFileError, tmp_path / "nope.gguf", "not found", "nope.gguf")
    with pytest.raises(ModelFileError, match="not found"):
        GGUFFile(tmp_path / "nope")


def test_directory(tmp_path):
    _raises(ModelFileError, tmp_path, "directory")


def test_text_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n" * 10)
    _raises(ModelFileError, path, "not a GGUF file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    _raises(ModelFileError, path, "empty.gguf")


def test_unsupported_gguf_version(tmp_path, tiny_file):
    data = bytearray(tiny_file.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    (tmp_path / "v99.gguf").write_bytes(bytes(data))
    _raises(ModelFileError, tmp_path / "v99.gguf", "version 99")


def _cut_points(path: Path) -> dict[str, list[int]]:
    """Where to cut the file, grouped by the region the cut falls in (from GGUFReader)."""
    reader = gguf.GGUFReader(path)
    fields = [f for f in reader.fields.values()]
    kv_start = next(f.offset for f in fields if not f.name.startswith("GGUF."))
    directory = sorted(t.field.offset for t in reader.tensors)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    header = list(range(0, 32)) + [kv_start - 1]
    metadata = sorted({p for f in fields if f.offset >= kv_start for p in (f.offset, f.offset + 1, f.offset + 9)}
                      | set(range(kv_start, directory[0], 97)))
    tensor_dir = sorted({p for o in directory for p in (o, o + 1, o + 8, o + 13)} | {reader.data_offset - 1})
    data = [reader.data_offset, reader.data_offset + 1, (reader.data_offset + data_end) // 2,
            *(t.data_offset + t.n_bytes // 2 for t in reader.tensors[::5]), data_end - 1]
    return {"header": header, "metadata": metadata, "tensor directory": tensor_dir, "tensor data": data}


def test_truncated_file_is_model_file_error(tmp_path, tiny_file):
    data = tiny_file.read_bytes()
    cut_file = tmp_path / "cut.gguf"
    cuts = _cut_points(tiny_file)
    assert sum(map(len, cuts.values())) > 100
    for region, points in cuts.items():
        for n in points:
            assert 0 <= n < len(data)
            cut_file.write_bytes(data[:n])
            try:
                GGUFFile(cut_file)
            except ModelFileError as e:
                assert "\n" not in str(e) and "cut.gguf" in str(e)
                assert "truncated" in str(e), (region, n, str(e))  # (not "corrupt array length")
            else:
                pytest.fail(f"cut at byte {n} ({region}) was accepted")
    # And through the public loader, one cut per region:
    for region, points in cuts.items():
        cut_file.write_bytes(data[: points[len(points) // 2]])
        _raises(ModelFileError, cut_file)


def test_block_count_beyond_the_files_layers_is_refused_before_building(tmp_path):
    metadata = {**tiny_metadata(), "llama.block_count": (4_000_000_000, V.UINT32)}
    path = write_gguf(tmp_path / "many.gguf", metadata, random_tiny_tensors())
    _raises(ModelFileError, path, "block_count is 4000000000, but the file has no tensors of layer")


def test_a_file_cut_inside_a_long_array_says_truncated(tmp_path):
    """The array's item count is read, and it is more than the bytes left: a truncated file (the
    real SmolLM2 file cut at byte 5,000, inside its 49,152 tokens, said "corrupt array length")."""
    metadata = {**tiny_metadata(), "test.long_array": (list(range(100_000)), V.ARRAY, V.UINT32)}
    data = write_gguf(tmp_path / "long.gguf", metadata, random_tiny_tensors()).read_bytes()
    key = data.index(b"test.long_array") + len(b"test.long_array")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: key + 4 + 4 + 8 + 40])  # value type, item type, item count, 10 of the items
    with pytest.raises(ModelFileError, match="truncated"):
        GGUFFile(cut)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(arch="mamba-xyz"), random_tiny_tensors())
    _raises(UnsupportedError, path, "'mamba-xyz'")


def test_no_architecture_key(tmp_path, tiny_file):
    data = tiny_file.read_bytes().replace(b"general.architecture", b"general.architecturX", 1)
    (tmp_path / "m.gguf").write_bytes(data)
    _raises(ModelFileError, tmp_path / "m.gguf", "general.architecture")


@pytest.mark.parametrize("type_name", ["Q2_K", "IQ2_XXS"])
def test_unsupported_tensor_type(tmp_path, type_name):
    # ffn_down's rows are d_ff = 256 values long: one k-quant super-block each.
    tensors = random_tiny_tensors(d_ff=256)
    block_size, type_size = gguf.constants.GGML_QUANT_SIZES[Q[type_name]]
    raw = np.random.default_rng(0).integers(0, 256, size=(TINY["d_model"], 256 // block_size * type_size), dtype=np.uint8)
    tensors["blk.1.ffn_down.weight"] = (raw, Q[type_name])
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(d_ff=256), tensors)
    _raises(UnsupportedError, path, "'blk.1.ffn_down.weight'", type_name)


def test_missing_tensor(tmp_path):
    tensors = random_tiny_tensors()
    del tensors["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(), tensors)
    _raises(ModelFileError, path, "missing", "blk.1.ffn_up.weight")


def test_wrong_tensor_shape(tmp_path):
    tensors = random_tiny_tensors()
    tensors["blk.0.attn_k.weight"] = np.zeros((48, TINY["d_model"]), dtype=np.float32)  # 3 KV heads, not 2
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(), tensors)
    _raises(ModelFileError, path, "blk.0.attn_k.weight", "(48, 64)", "(32, 64)")


def test_missing_required_metadata(tmp_path):
    meta = tiny_metadata()
    del meta["llama.block_count"]
    path = write_gguf(tmp_path / "m.gguf", meta, random_tiny_tensors())
    _raises(ModelFileError, path, "llama.block_count")


def test_unknown_catalogue_name():
    message = _raises(LucidError, "no-such-model", "no-such-model")
    assert "smollm2-135m-instruct" in message  # the error lists what the catalogue has


def test_unsupported_tokenizer_model(tmp_path):
    meta = tiny_metadata()
    meta["tokenizer.ggml.model"] = ("rwkv", V.STRING)
    path = write_gguf(tmp_path / "m.gguf", meta, random_tiny_tensors())
    _raises(UnsupportedError, path, "'rwkv'")


def test_no_tokenizer_tokens(tmp_path):
    meta = tiny_metadata()
    del meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    meta["llama.vocab_size"] = (VOCAB_SIZE, V.UINT32)
    path = write_gguf(tmp_path / "m.gguf", meta, random_tiny_tensors())
    _raises(ModelFileError, path, "tokenizer.ggml.tokens")


def test_vocabulary_and_embedding_disagree(tmp_path):
    meta = tiny_metadata()
    meta["llama.vocab_size"] = (VOCAB_SIZE + 8, V.UINT32)
    tensors = random_tiny_tensors()
    for name in ("token_embd.weight", "output.weight"):
        tensors[name] = np.concatenate([tensors[name], tensors[name][:8]])
    path = write_gguf(tmp_path / "m.gguf", meta, tensors)
    _raises(ModelFileError, path, str(VOCAB_SIZE), str(VOCAB_SIZE + 8))


def _patch_tensor_directory(path: Path, name: str, n_dims: int, dims: list[int]) -> None:
    """Overwrite the n_dims and dims of tensor `name`'s directory entry in place."""
    data = bytearray(path.read_bytes())
    entry = data.index(len(name).to_bytes(8, "little") + name.encode()) + 8 + len(name)
    data[entry : entry + 4] = n_dims.to_bytes(4, "little")
    for k, d in enumerate(dims):
        data[entry + 4 + 8 * k : entry + 12 + 8 * k] = d.to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("n_dims", "dims", "fragment"), [
    (2, [2**32, 2**32], "truncated"),  # 2**64 elements: must not wrap around to 0 bytes
    (2, [2**63, 2], "truncated"),
    (2**31, [], "dimensions"),
], ids=["huge-dims", "huge-dims-2", "huge-n-dims"])
def test_corrupt_tensor_dims(tmp_path, n_dims, dims, fragment):
    path = write_tiny_model(tmp_path / "m.gguf")
    _patch_tensor_directory(path, "blk.0.attn_q.weight", n_dims, dims)
    with pytest.raises(ModelFileError, match=fragment):
        GGUFFile(path)
    _raises(ModelFileError, path, fragment)


@pytest.mark.parametrize("alignment", [0, 7])
def test_bad_alignment(tmp_path, alignment):
    path = write_tiny_model(tmp_path / "m.gguf")
    data = path.read_bytes()
    # Insert the key general.alignment (u32) before the first key and bump the key count.
    key = b"general.alignment"
    entry = len(key).to_bytes(8, "little") + key + (4).to_bytes(4, "little") + alignment.to_bytes(4, "little")
    n_kv = int.from_bytes(data[16:24], "little")
    first_key = 24  # magic, version, tensor count, kv count
    patched = data[:16] + (n_kv + 1).to_bytes(8, "little") + entry + data[first_key:]
    (tmp_path / "m.gguf").write_bytes(patched)
    _raises(ModelFileError, tmp_path / "m.gguf", "alignment")


# ----- metadata the model cannot be built from: a ModelFileError naming the file, before any tensor -----

@pytest.mark.parametrize(("sizes", "fragment"), [
    (dict(n_heads=0), "n_heads must be a positive integer, got 0"),  # was a ZeroDivisionError (d_model // n_heads)
    (dict(n_kv_heads=0), "n_kv_heads must be a positive integer, got 0"),  # ZeroDivisionError (n_heads % n_kv_heads)
    (dict(n_heads=4, n_kv_heads=3), "4 query heads cannot be grouped over 3 KV heads"),  # was a bare ValueError
    (dict(n_layers=0), "n_layers must be a positive integer, got 0"),  # loaded a model without layers
    (dict(context_length=0), "context_length must be a positive integer, got 0"),
    (dict(rope_base=float("nan")), "rope_base must be a finite positive number, got nan"),  # generated nothing
    (dict(rope_base=float("inf")), "rope_base must be a finite positive number, got inf"),
    (dict(norm_eps=-1e-5), "norm_eps must be a finite positive number"),
], ids=["heads-0", "kv-heads-0", "heads-not-grouped", "layers-0", "context-0", "rope-nan", "rope-inf", "eps-negative"])
def test_unusable_config_values(tmp_path, sizes, fragment):
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(**sizes), random_tiny_tensors())
    _raises(ModelFileError, path, fragment, "m.gguf")


def test_width_not_a_multiple_of_the_heads(tmp_path):
    # No attention.key_length: the head size is d_model / n_heads, which must be whole (64 / 6 is not).
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(n_heads=6, n_kv_heads=6), random_tiny_tensors())
    _raises(ModelFileError, path, "d_model 64 is not a multiple of 6 heads", "m.gguf")


def test_unusable_gemma3_config_value(tmp_path):
    meta = tiny_metadata(arch="gemma3", n_heads=0)
    meta["gemma3.attention.sliding_window"] = (16, V.UINT32)
    path = write_gguf(tmp_path / "m.gguf", meta, random_tiny_tensors())
    _raises(ModelFileError, path, "n_heads must be a positive integer, got 0", "m.gguf")


def test_metadata_value_of_the_wrong_type(tmp_path):
    meta = tiny_metadata()
    meta["llama.block_count"] = ([1, 2], V.ARRAY, V.UINT32)
    _raises(ModelFileError, write_gguf(tmp_path / "m.gguf", meta, random_tiny_tensors()), "m.gguf")


# ----- tensors the model would not use: refused, as by the Hugging Face loader -----

def test_layers_beyond_block_count_are_refused(tmp_path):
    """block_count 1 over a file with 2 layers of tensors: the second would be silently ignored."""
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(n_layers=1), random_tiny_tensors())
    _raises(ModelFileError, path, "m.gguf", "does not use", "blk.1.")


def test_unknown_tensor_is_refused(tmp_path):
    tensors = random_tiny_tensors()
    tensors["blk.0.attn_q.bias"] = np.zeros(TINY["d_model"], dtype=np.float32)  # a bias Llama never adds
    path = write_gguf(tmp_path / "m.gguf", tiny_metadata(), tensors)
    _raises(ModelFileError, path, "does not use: blk.0.attn_q.bias")


def test_rope_freqs_tensor_is_skipped(tmp_path):
    tensors = random_tiny_tensors()
    tensors["rope_freqs.weight"] = np.ones(TINY["d_model"] // TINY["n_heads"] // 2, dtype=np.float32)
    model = lucidlm.load(str(write_gguf(tmp_path / "m.gguf", tiny_metadata(), tensors)), progress=False)
    assert model.model.config.n_layers == TINY["n_layers"]
