"""`lucid inspect | trace | attention | embed-map | kv-demo` on a tiny model file.

Most runs call `lucidlm.cli.main` in this process (fast); two run the real `lucid` process to
check that user errors end with status 2 and one stderr line, like every other command.
"""

import json
from pathlib import Path

import pytest
from test_cli import assert_user_error, lucid
from test_loading_gguf import write_tiny_model

from lucidlm.cli import main
from lucidlm.kernels import cpu_decode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("introspect-cli") / "tiny.gguf"))


def run_json(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect(capsys, tiny):
    d = run_json(capsys, "inspect", "--model", tiny)
    kv_dtype = "float16" if cpu_decode.available() else "float32"  # float16 where our decode attention kernel runs
    kv_bytes = 2 * 2 * 2 * 16 * (2 if kv_dtype == "float16" else 4)
    assert d["config"]["n_layers"] == 2 and d["parameters"] > 0 and d["kv_cache_bytes_per_token"] == kv_bytes
    assert main(["inspect", "--model", tiny]) == 0
    text = capsys.readouterr().out
    for fragment in ("Llama(", "(0-1): 2 x Block(", "parameters:", "F32", f"KV cache: {kv_bytes} bytes per token (K and V, {kv_dtype},",
                     "blocks.{0-1}.attn.hook_pattern"):
        assert fragment in text


def test_trace_with_lens(capsys, tiny, tmp_path):
    d = run_json(capsys, "trace", "the capital of France is", "--model", tiny, "--steps", "3", "--top-k", "4",
                 "--lens", "--out", str(tmp_path))
    assert len(d["steps"]) == 3 and all(len(s["candidates"]) == 4 for s in d["steps"])
    assert d["steps"][0]["chosen"] == d["steps"][0]["candidates"][0]  # greedy takes the top candidate
    assert Path(d["lens"]["image"]) == tmp_path / "lens.png" and (tmp_path / "lens.png").stat().st_size > 0
    assert len(d["lens"]["positions"]) == 1 and len(d["lens"]["positions"][0]["layers"]) == 2
    assert main(["trace", "the capital", "--model", tiny, "--steps", "2", "--temperature", "0.8", "--seed", "1",
                 "--lens", "--all-positions", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "drawn" in text and "every position" in text and f"wrote {tmp_path / 'lens.png'}" in text


@pytest.mark.parametrize(("extra", "image"), [(["--head", "1"], "attention-L1-H1.png"),
                                               (["--mean"], "attention-L1-mean.png"), ([], "attention-L1-heads.png")])
def test_attention(capsys, tiny, tmp_path, extra, image):
    d = run_json(capsys, "attention", "hello world", "--model", tiny, "--layer", "1", "--out", str(tmp_path), *extra)
    assert d["image"] == str(tmp_path / image) and Path(d["image"]).exists()
    assert d["page"] == str(tmp_path / "attention.html") and Path(d["page"]).exists()
    rows = d["pattern"] if extra else d["pattern"][0]
    assert all(sum(row) == pytest.approx(1, abs=1e-3) for row in rows) and len(rows) == len(d["tokens"])


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embed_map(capsys, tiny, tmp_path, method):
    words = ["hello", "world", "Paris", "France"]
    d = run_json(capsys, "embed-map", *words, "--model", tiny, "--method", method, "--contextual", "--out", str(tmp_path))
    assert d["words"] == words and len(d["coords"]) == 4 and Path(d["image"]).exists()


def test_kv_demo(capsys, tiny):
    d = run_json(capsys, "kv-demo", "--model", tiny, "--max-new-tokens", "3", "--prompt", "hello")
    assert d["identical"] and len(d["token_ids_with_cache"]) == 3


@pytest.mark.parametrize(("args", "message"), [
    (["attention", "hi", "--layer", "2"], "layer 2 is out of range: the model has 2 layers (0-1)"),
    (["attention", "hi", "--layer", "0", "--head", "4"], "head 4 is out of range: each layer has 4 attention heads"),
    (["embed-map", "--model", "/no/such/file.gguf"], "no words given"),  # checked before loading
    (["embed-map", "hi", "", "--model", "/no/such/file.gguf"], "empty word"),
    (["trace", "hi", "--steps", "0"], "--steps must be >= 1"),
    (["trace", "hi", "--top-p", "0"], "top_p"),
    (["attention", "", "--layer", "0"], "the prompt is empty"),
    (["attention", "word " * 300, "--layer", "0"], "exceed the model's context length of 256"),
    (["attention", "hi", "--layer", "0", "--out", "/dev/null/maps"], "Not a directory: /dev/null/maps"),
    (["trace", "hi", "--steps", "1", "--lens", "--out", "/dev/null/x"], "Not a directory"),
])
def test_bad_input_is_one_line(capsys, tiny, args, message):
    argv = args if "--model" in args else [*args, "--model", tiny]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("lucid: error: ") and message in captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["attention", "hi", "--layer", "7"], "layer 7 is out of range"),
    (["embed-map"], "no words given"),
])
def test_bad_input_exits_2_as_a_process(tiny, args, message):
    result, _ = lucid(*args, "--model", tiny)
    assert result.returncode == 2
    assert_user_error(result, message)


@pytest.fixture(scope="module")
def minilm_path() -> str:
    from lucidlm.loading.catalogue import CATALOGUE

    path = CATALOGUE["minilm-l6-v2"].locate()
    if not path:
        pytest.skip("the MiniLM package is not installed")
    return str(path)


@pytest.mark.parametrize(("args", "message"), [
    (["trace", "hi", "--steps", "2"], "is an encoder"),
    (["embed-map", "king", "queen"], "use `lucid embed`"),
])
def test_decoder_commands_refuse_an_encoder(capsys, minilm_path, args, message):
    assert main([*args, "--model", minilm_path]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and message in captured.err


def test_inspect_an_encoder(capsys, minilm_path):
    d = run_json(capsys, "inspect", "--model", minilm_path)
    assert d["kv_cache_bytes_per_token"] is None and d["config"]["n_layers"] == 6
    assert main(["inspect", "--model", minilm_path]) == 0
    assert "KV cache: none" in capsys.readouterr().out


def test_attention_maps_have_a_length_limit(capsys, tiny, monkeypatch):
    """Every layer's (H, T, T) weights are kept for the page: long prompts are refused before the pass."""
    from lucidlm import cli_introspect

    monkeypatch.setattr(cli_introspect, "MAX_ATTENTION_TOKENS", 4)
    assert main(["attention", "hello world hello world hello world", "--layer", "0", "--model", tiny]) == 2
    assert "attention maps are drawn for at most 4" in capsys.readouterr().err
