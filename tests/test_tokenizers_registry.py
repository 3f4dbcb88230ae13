"""Tests for `load_tokenizer` (one entry point for every tokenizer source) and `lucid tokenize`."""

import json
import os
import subprocess
import sys

import pytest

from lucidlm.errors import LucidError, ModelFileError, UnsupportedError
from lucidlm.tokenizers import (
    TOKENIZER_NAMES,
    BPETokenizer,
    TiktokenTokenizer,
    WordPieceTokenizer,
    load_tokenizer,
)
from lucidlm.tokenizers.display import display_width, format_tokenization, token_text

SEED_TEXT = "English and CAPITALIZATION 🎵."


def test_short_names_load_the_right_kind():
    assert isinstance(load_tokenizer("minilm"), WordPieceTokenizer)
    assert isinstance(load_tokenizer("bert"), WordPieceTokenizer)
    assert isinstance(load_tokenizer("cl100k"), TiktokenTokenizer)
    assert load_tokenizer("gpt4").encode(SEED_TEXT) == [23392, 323, 78387, 50125, 11410, 236, 113, 13]
    assert set(TOKENIZER_NAMES) >= {"smollm2", "gemma3", "minilm", "bert", "cl100k", "gpt4"}


def test_files_and_directories_are_recognised(tmp_path):
    minilm_json = TOKENIZER_NAMES["minilm"].find()
    assert isinstance(load_tokenizer(minilm_json.parent), WordPieceTokenizer)  # a directory
    assert isinstance(load_tokenizer(str(minilm_json)), WordPieceTokenizer)
    renamed = tmp_path / "vocab.data"  # no telling suffix: recognised by its content
    renamed.write_bytes(minilm_json.read_bytes())
    assert isinstance(load_tokenizer(renamed), WordPieceTokenizer)


def test_gguf_file_is_read(tmp_path):
    from test_loading_gguf import write_tiny_model

    tokenizer = load_tokenizer(write_tiny_model(tmp_path / "tiny.gguf"))
    assert isinstance(tokenizer, BPETokenizer)


@pytest.mark.parametrize(("content", "error", "message"), [
    (b"GGUF\x03\x00\x00\x00", ModelFileError, "truncated"),
    (b"\x00\x01binary junk", ModelFileError, "not a tokenizer file"),
    (b"{not json", ModelFileError, "not a readable tokenizer.json"),
    (b'{"model": {"type": "WordLevel", "vocab": {}}}', UnsupportedError, "WordLevel"),
])
def test_bad_files_are_clear_errors(tmp_path, content, error, message):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        load_tokenizer(path)


def test_unknown_name_lists_the_names(tmp_path):
    with pytest.raises(LucidError, match="smollm2, gemma3, minilm, cl100k, bert, gpt4"):
        load_tokenizer("no-such-tokenizer")
    with pytest.raises(ModelFileError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_display_makes_whitespace_and_partial_characters_visible():
    cl100k = load_tokenizer("cl100k")
    ids = cl100k.encode(" a\n🎵")
    assert [token_text(cl100k, i) for i in ids] == ["␣a", "↵", "\\xf0\\x9f", "\\x8e", "\\xb5"]
    assert display_width("漢字a") == 5 and display_width("e\u0301") == 1
    table = format_tokenization("cl100k", cl100k, cl100k.encode("Hello world"), colour=False)
    assert table.splitlines() == ["cl100k: 2 tokens  (vocabulary 100,277, TiktokenTokenizer)",
                                  "  Hello ␣world", "  9906  1917"]
    narrow = format_tokenization("cl100k", cl100k, cl100k.encode("a b c d e f g h"), colour=False, width=12)
    assert len(narrow.splitlines()) > 3 and all(display_width(line) <= 12 for line in narrow.splitlines()[1:])


# ----- lucid tokenize -----
# In-process through `main` (fast); the slow test runs the command as a user does.


def lucid(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lucidlm.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    from lucidlm.cli import main

    returncode = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, returncode, captured.out, captured.err)


def test_cli_compares_tokenizers_side_by_side(capsys):
    result = run_main(capsys, "tokenize", SEED_TEXT, "--tokenizer", "minilm", "--tokenizer", "gpt4")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "minilm: 8 tokens  (vocabulary 30,522, WordPieceTokenizer)"
    assert lines[1].split() == ["[CLS]", "english", "and", "capital", "##ization", "[UNK]", ".", "[SEP]"]
    assert lines[2].split() == ["101", "2394", "1998", "3007", "3989", "100", "1012", "102"]
    assert "gpt4: 8 tokens  (vocabulary 100,277, TiktokenTokenizer)" in lines
    assert "\x1b[" not in result.stdout  # no colour when the output is not a terminal


def test_cli_json_output(capsys):
    result = run_main(capsys, "tokenize", SEED_TEXT, "--tokenizer", "cl100k", "--tokenizer", "bert", "--json", "--no-special")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["text"] == SEED_TEXT
    cl100k, bert = data["results"]
    assert (cl100k["tokenizer"], cl100k["vocab_size"], cl100k["count"]) == ("cl100k", 100277, 8)
    assert cl100k["pieces"][:3] == ["English", "Ġand", "ĠCAPITAL"] and cl100k["texts"][1] == " and"
    assert bert["ids"][0] == 2394  # --no-special: no [CLS]


def test_cli_unknown_tokenizer_is_one_line_listing_the_names(capsys):
    result = run_main(capsys, "tokenize", "hi", "--tokenizer", "minilm", "--tokenizer", "nope")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lucid: error: unknown tokenizer 'nope'")
    assert "smollm2, gemma3, minilm, cl100k, bert, gpt4" in lines[0]


@pytest.mark.slow
def test_cli_seed_comparison_with_every_named_tokenizer():
    result = lucid("tokenize", SEED_TEXT, *[arg for name in ("smollm2", "gemma3", "minilm", "cl100k")
                                            for arg in ("--tokenizer", name)], "--json")
    assert result.returncode == 0, result.stderr
    counts = {r["tokenizer"]: (r["count"], r["vocab_size"]) for r in json.loads(result.stdout)["results"]}
    assert counts == {"smollm2": (11, 49152), "gemma3": (8, 262144), "minilm": (8, 30522), "cl100k": (8, 100277)}
