"""The `lucid` command, run as a subprocess the way a user runs it.

User errors must end the process with a non-zero status and one stderr line
"lucid: error: ...", never a traceback; parameter errors must be reported before the
model is loaded. The slow tests generate with the real default model and check the
answer against a fact about the world (the capital of France is Paris).
"""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_loading_gguf import write_tiny_model

from lucidlm.loading.catalogue import CATALOGUE

PROMPT = "The capital of France is"
STATS_LINE = re.compile(r"^\[(\d+) prompt tokens, time to first token (\d+) ms, (\d+) new tokens at ([\d.]+) tok/s\]$")


def lucid(*args: str, stdin: str | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "lucidlm.cli", *args], input=stdin, capture_output=True,
                            text=True, timeout=timeout, env=env)
    return result, time.perf_counter() - started


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, nothing on stdout, and exactly one stderr line: 'lucid: error: ...'."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lucid: error: "), result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "tiny.gguf", context_length=256)


# ----- bad input -----

def test_missing_model_file(tmp_path):
    result, _ = lucid("generate", PROMPT, "--model", str(tmp_path / "missing.gguf"))
    assert_user_error(result, "not found", "missing.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("just some text\n")
    result, _ = lucid("generate", PROMPT, "--model", str(path))
    assert_user_error(result, "not a GGUF file")


def test_truncated_file(tmp_path, tiny_model):
    data = tiny_model.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    result, _ = lucid("generate", PROMPT, "--model", str(path))
    assert_user_error(result, "truncated")


# Parameter checks, with the real default model: they must fail without loading it.
@pytest.mark.parametrize(("args", "name"), [
    (["generate", ""], "prompt"),
    (["generate", PROMPT, "--temperature", "-1"], "temperature"),
    (["generate", PROMPT, "--top-p", "0"], "top_p"),
    (["generate", PROMPT, "--top-p", "1.5"], "top_p"),
    (["generate", PROMPT, "--top-k", "-1"], "top_k"),
    (["chat", "--temperature", "-1"], "temperature"),
    (["generate", PROMPT, "--prompt-lookup", "-1"], "prompt_lookup"),
    (["chat", "--prompt-lookup", "-2"], "prompt_lookup"),
], ids=["empty-prompt", "temperature", "top-p-0", "top-p-1.5", "top-k", "chat-temperature", "prompt-lookup",
        "chat-prompt-lookup"])
def test_bad_parameter_fails_fast(args, name):
    result, seconds = lucid(*args)
    assert_user_error(result, name)
    # Starting Python and importing torch take a few seconds; loading the model would add
    # 5-10 s more here. (The test below proves the order without timing.)
    assert seconds < 20, seconds


def test_parameters_are_checked_before_the_model_is_loaded(tmp_path):
    # Were the model opened first, the error would be about the missing file.
    result, _ = lucid("generate", PROMPT, "--top-p", "1.5", "--model", str(tmp_path / "missing.gguf"))
    message = assert_user_error(result, "top_p")
    assert "missing.gguf" not in message


def test_context_overflow(tiny_model):
    result, _ = lucid("generate", "hello world", "--model", str(tiny_model), "--max-new-tokens", "100000")
    assert_user_error(result, "context length of 256")


def test_negative_max_new_tokens(tiny_model):
    result, _ = lucid("generate", "hello world", "--model", str(tiny_model), "--max-new-tokens", "-1")
    assert_user_error(result, "max_new_tokens")


# ----- normal use -----

def test_generate_with_tiny_model(tiny_model):
    result, _ = lucid("generate", "hello world", "--model", str(tiny_model), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    stats = STATS_LINE.match(result.stderr.strip().split("\n")[-1])
    assert stats and int(stats.group(1)) > 0, result.stderr


def test_generate_with_prompt_lookup_gives_the_same_greedy_text(tiny_model):
    args = ("generate", "hello world hello world hello", "--model", str(tiny_model), "--max-new-tokens", "12")
    plain, _ = lucid(*args)
    looked_up, _ = lucid(*args, "--prompt-lookup", "3")
    assert plain.returncode == 0 and looked_up.returncode == 0, looked_up.stderr
    assert looked_up.stdout == plain.stdout and plain.stdout.strip()


def test_models_lists_the_installed_default():
    result, _ = lucid("models")
    assert result.returncode == 0, result.stderr
    entry = CATALOGUE["smollm2-135m-instruct"]
    installed = Path(importlib.util.find_spec(entry.module).origin).parent / entry.relative_path
    assert installed.is_file()
    assert "smollm2-135m-instruct (default)" in result.stdout
    assert f"installed: {installed}" in result.stdout


@pytest.mark.slow
def test_generate_with_default_model():
    result, _ = lucid("generate", PROMPT, "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Traceback" not in result.stderr
    stats = STATS_LINE.match(result.stderr.strip().split("\n")[-1])
    assert stats, result.stderr
    prompt_tokens, ttft_ms, new_tokens, tok_s = stats.groups()
    assert int(prompt_tokens) > 0 and int(ttft_ms) > 0 and 0 < int(new_tokens) <= 8 and float(tok_s) > 0


@pytest.mark.slow
def test_chat_with_default_model():
    result, _ = lucid("chat", "--max-new-tokens", "16", stdin="What is the capital of France?\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Traceback" not in result.stderr


def test_bench_reports_every_measure(tiny_model, capsys):
    """`lucid bench` on a tiny model: prompt lengths that do not fit the 256-token context are
    skipped, every figure is a positive number and the decode count is what was asked for."""
    import json

    from lucidlm.cli import main

    assert main(["bench", "--model", str(tiny_model), "--runs", "1", "--decode-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["prefill_tokens_per_second"]) == ["128"]
    assert result["decode_tokens"] == 4 and result["runs"] == 1
    for key in ("load_seconds", "time_to_first_token", "decode_tokens_per_second", "peak_rss_mib"):
        assert result[key] > 0, key
    assert main(["bench", "--model", str(tiny_model), "--runs", "0"]) == 2
