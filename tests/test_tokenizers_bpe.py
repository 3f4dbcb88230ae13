"""Tests for the byte-level BPE tokenizer and the streaming decoder.

The fast tests use tiny hand-made vocabularies. The slow ones load SmolLM2's GGUF and
compare against Hugging Face tokenizers built from the same file (test-only oracles):

- `hf_smollm_tokenizer` (conftest): `AutoTokenizer.from_pretrained(dir, gguf_file=...)`,
  unmodified. For the "smollm" pre-tokenizer transformers 5.23 keeps the plain GPT-2 regex.
- `smollm2_reference`: the same tokenizer with SmolLM2's published pre-tokenizer restored
  (Digits(individual_digits=True) then ByteLevel), which is also what llama.cpp runs for
  "smollm". The two differ when a digit follows a whitespace run or on non-ASCII numerals
  (see `test_transformers_gguf_tokenizer_differs_from_smollm2_in_digit_splitting`); we
  follow the model.
"""

import copy
import random
import time

import pytest
from tokenizer_corpus import CORPUS

from lucidlm.errors import UnsupportedError
from lucidlm.tokenizers import BPETokenizer, IncrementalDecoder
from lucidlm.tokenizers.byte_level import bytes_to_unicode, unicode_to_bytes
from lucidlm.tokenizers.pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, pre_tokenizer_for

CORPUS_IDS = [f"corpus{index}" for index in range(len(CORPUS))]
STREAM_TEXT = "é🎵漢字👨‍👩‍👧"


# ----- tiny vocabularies -----

BYTE_CHARS = [bytes_to_unicode()[byte] for byte in range(256)]


def byte_tokenizer(merges=(), extra_tokens=(), specials=(), pre="gpt2", **kwargs) -> BPETokenizer:
    """A tokenizer whose vocabulary is every single byte, plus `extra_tokens`, plus control `specials`."""
    tokens = [*BYTE_CHARS, *extra_tokens, *specials]
    types = [1] * (256 + len(extra_tokens)) + [3] * len(specials)
    defaults = dict(bos_id=None, eos_id=None, add_bos=False)
    return BPETokenizer(tokens, list(merges), types, pre, **{**defaults, **kwargs})


def pieces(tokenizer: BPETokenizer, text: str) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in tokenizer.encode(text)]


def test_byte_alphabet_is_printable_and_invertible():
    chars = bytes_to_unicode()
    assert sorted(chars) == list(range(256))
    assert len(set(chars.values())) == 256
    assert all(char.isprintable() and not char.isspace() for char in chars.values())
    assert chars[ord("a")] == "a" and chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ"
    assert all(unicode_to_bytes()[char] == byte for byte, char in chars.items())


def test_merges_apply_in_rank_order():
    # "b c" outranks "a b", so "abc" must become a + bc even though "ab" comes first.
    tokenizer = byte_tokenizer(merges=["b c", "a b"], extra_tokens=["bc", "ab"])
    assert pieces(tokenizer, "abc") == ["a", "bc"]
    assert pieces(tokenizer, "abab") == ["ab", "ab"]


def test_equal_rank_pairs_merge_leftmost_first():
    tokenizer = byte_tokenizer(merges=["a a"], extra_tokens=["aa"])
    assert pieces(tokenizer, "aaa") == ["aa", "a"]
    assert pieces(tokenizer, "aaaaa") == ["aa", "aa", "a"]


def test_merges_build_on_earlier_merges():
    merges = ["l l", "h e", "he ll", "hell o", "Ġ w"]
    tokenizer = byte_tokenizer(merges=merges, extra_tokens=["ll", "he", "hell", "hello", "Ġw"])
    assert pieces(tokenizer, "hello world") == ["hello", "Ġw", "o", "r", "l", "d"]


def test_special_tokens_match_whole_and_longest_first():
    tokenizer = byte_tokenizer(specials=["<|im|>", "<|im|>x"])
    short_id, long_id = 256, 257
    assert tokenizer.encode("a<|im|>xb") == [ord("a"), long_id, ord("b")]
    assert tokenizer.encode("<|im|><|im|>") == [short_id, short_id]
    assert tokenizer.encode("<|im|", add_special=False) == list(b"<|im|")
    assert tokenizer.special_ids == {short_id, long_id} and tokenizer.is_special(long_id)
    assert tokenizer.decode(tokenizer.encode("a<|im|>b"), skip_special=True) == "ab"


def test_bos_and_eos_follow_metadata_flags():
    tokenizer = byte_tokenizer(specials=["<s>", "</s>"], bos_id=256, eos_id=257, add_bos=True, add_eos=True)
    assert tokenizer.encode("hi") == [256, ord("h"), ord("i"), 257]
    assert tokenizer.encode("hi", add_special=False) == [ord("h"), ord("i")]


def test_token_bytes_and_pieces():
    tokenizer = byte_tokenizer(merges=["Ġ w"], extra_tokens=["Ġw"], specials=["<|end|>"])
    assert tokenizer.vocab_size == 258
    assert tokenizer.token_bytes(256) == b" w" and tokenizer.id_to_piece(256) == "Ġw"
    assert tokenizer.piece_to_id("Ġw") == 256 and tokenizer.piece_to_id("missing") is None
    assert tokenizer.token_bytes(257) == b"<|end|>"


def test_unknown_pre_tokenizer_is_named_with_the_supported_ones():
    with pytest.raises(UnsupportedError) as error:
        byte_tokenizer(pre="no-such-regex")
    assert "no-such-regex" in str(error.value)
    for name in ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2"):
        assert name in str(error.value)


def test_non_bpe_vocabulary_is_rejected():
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(UnsupportedError, match="llama"):
        BPETokenizer.from_gguf_metadata(meta)


def hf_split(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def hf_words(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


REGEX_OF_PRE = {
    "gpt2": GPT2_PATTERN,
    "default": GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "qwen2": QWEN2_PATTERN,
}


@pytest.mark.parametrize("pre", REGEX_OF_PRE)
def test_pre_tokenizer_splits_like_hf_tokenizers(pre):
    reference = hf_split(REGEX_OF_PRE[pre])
    for text in CORPUS:
        assert pre_tokenizer_for(pre).split(text) == hf_words(reference, text), text


def test_smollm_pre_tokenizer_splits_like_hf_digits_then_gpt2():
    from tokenizers import pre_tokenizers

    reference = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), hf_split(GPT2_PATTERN)])
    for text in CORPUS:
        assert pre_tokenizer_for("smollm").split(text) == hf_words(reference, text), text


# ----- streaming -----


def stream(tokenizer, ids, skip_special=False) -> list[str]:
    decoder = IncrementalDecoder(tokenizer, skip_special=skip_special)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_never_splits_a_character():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(STREAM_TEXT)  # one token per byte
    parts = stream(tokenizer, ids)
    assert "".join(parts) == STREAM_TEXT
    assert all("\ufffd" not in part for part in parts)
    assert parts[0] == "" and parts[1] == "é"  # 'é' is two bytes: held back until complete


def test_stream_replaces_invalid_bytes_once_they_cannot_complete():
    tokenizer = byte_tokenizer()
    assert stream(tokenizer, [0xE6, ord("A")]) == ["", "\ufffdA", ""]
    assert stream(tokenizer, [0xF0, 0x9F]) == ["", "", "\ufffd"]
    assert "".join(stream(tokenizer, [0xFF, 0xC3, 0xA9, 0x80])) == tokenizer.decode([0xFF, 0xC3, 0xA9, 0x80])


def test_stream_skips_special_tokens_when_asked():
    tokenizer = byte_tokenizer(specials=["<|end|>"])
    ids = tokenizer.encode("a<|end|>b")
    assert "".join(stream(tokenizer, ids)) == "a<|end|>b"
    assert "".join(stream(tokenizer, ids, skip_special=True)) == "ab"


# ----- SmolLM2 GGUF against the Hugging Face oracles -----


@pytest.fixture(scope="session")
def smollm2_metadata(smollm_path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(smollm_path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def tokenizer(smollm2_metadata) -> BPETokenizer:
    return BPETokenizer.from_gguf_metadata(smollm2_metadata)


@pytest.fixture(scope="session")
def gpt2_split_tokenizer(smollm2_metadata) -> BPETokenizer:
    """SmolLM2's vocabulary with the plain GPT-2 regex, the split transformers' GGUF loader uses."""
    return BPETokenizer.from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "gpt2"})


@pytest.fixture(scope="session")
def smollm2_reference(hf_smollm_tokenizer):
    from tokenizers import pre_tokenizers

    reference = copy.deepcopy(hf_smollm_tokenizer)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return reference


@pytest.mark.slow
def test_smollm2_metadata_is_read(tokenizer):
    assert tokenizer.vocab_size == 49152 and tokenizer.pre == "smollm"
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (1, 2, False)
    assert tokenizer.special_ids == set(range(17))
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    assert tokenizer.id_to_piece(905) == "Ġworld" and tokenizer.token_bytes(905) == b" world"
    assert tokenizer.encode("<|im_start|>") == [1]


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_encode_matches_smollm2_reference(tokenizer, smollm2_reference, text):
    assert tokenizer.encode(text) == smollm2_reference(text).input_ids


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_gpt2_split_matches_transformers_gguf_tokenizer(gpt2_split_tokenizer, hf_smollm_tokenizer, text):
    assert gpt2_split_tokenizer.encode(text) == hf_smollm_tokenizer(text).input_ids


@pytest.mark.slow
def test_transformers_gguf_tokenizer_differs_from_smollm2_in_digit_splitting(
    tokenizer, hf_smollm_tokenizer, smollm2_reference
):
    # transformers' GGUF loader has no "smollm" entry and keeps the plain GPT-2 regex, which
    # lets a digit take the last space of a run: "a\n\n1" -> a, Ċ, Ċ, 1 instead of a, ĊĊ, 1.
    text = "a\n\n1"
    assert tokenizer.encode(text) == smollm2_reference(text).input_ids == [81, 1116, 33]
    assert hf_smollm_tokenizer(text).input_ids == [81, 198, 198, 33]


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS, ids=CORPUS_IDS)
def test_stream_matches_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    parts = stream(tokenizer, ids)
    assert "".join(parts) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in part for part in parts)


@pytest.mark.slow
def test_stream_holds_back_partial_emoji(tokenizer):
    ids = tokenizer.encode(STREAM_TEXT)
    parts = stream(tokenizer, ids)
    assert "".join(parts) == STREAM_TEXT
    assert all("\ufffd" not in part for part in parts)
    assert "" in parts[:-1]  # 🎵 spans three tokens, so some pushes return nothing


@pytest.mark.slow
def test_decode_matches_oracle_on_random_ids(tokenizer, hf_smollm_tokenizer):
    reference = hf_smollm_tokenizer
    # Random ids often end mid-character, so this also checks where U+FFFD appears.
    rng = random.Random(1234)
    for _ in range(500):
        # Low ids (specials, single bytes) are drawn more often than their share of the vocab.
        ids = [rng.choice((rng.randrange(tokenizer.vocab_size), rng.randrange(300))) for _ in range(rng.randint(1, 12))]
        assert tokenizer.decode(ids) == reference.decode(ids), ids
        assert tokenizer.decode(ids, skip_special=True) == reference.decode(ids, skip_special_tokens=True), ids
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


@pytest.mark.slow
@pytest.mark.parametrize("text", ["\x04", "a\x1db", "\U00040000", "x\U000a0000 y"])
def test_bytes_missing_from_vocab_are_dropped_like_the_oracle(tokenizer, smollm2_reference, text):
    # SmolLM2's vocabulary has no token for 21 byte values (0x04, 0x1D, 0xF1, ...), so text
    # using them cannot round-trip; the reference tokenizers drop those bytes silently.
    assert tokenizer.encode(text) == smollm2_reference(text).input_ids
    assert tokenizer.decode(tokenizer.encode(text)) != text


@pytest.mark.slow
def test_encoding_2000_tokens_is_fast(smollm2_metadata):
    fresh = BPETokenizer.from_gguf_metadata(smollm2_metadata)  # empty word cache: worst case
    passage = "\n".join(text for text in CORPUS if len(text) < 200)
    start = time.perf_counter()
    ids = fresh.encode(passage)
    elapsed = time.perf_counter() - start
    assert len(ids) >= 2000
    assert elapsed < 0.1, f"{len(ids)} tokens took {elapsed * 1000:.1f} ms"
