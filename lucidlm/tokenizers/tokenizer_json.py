"""Reading a Hugging Face `tokenizer.json`: which tokenizer it describes, and its settings.

The file is a pipeline: `normalizer` -> `pre_tokenizer` -> `model` -> `post_processor`,
decoded by `decoder`, with `added_tokens` matched whole before all of it. We read it into
one of our tokenizers:

- model "WordPiece"                            -> WordPieceTokenizer (BERT);
- model "BPE" with a ByteLevel pre-tokenizer   -> BPETokenizer (GPT-2, Qwen 2, Llama 3);
- any other model "BPE"                        -> SentencePieceBPETokenizer (Llama 2, Phi-3:
  characters with "▁" for spaces and byte fallback).

Settings that only matter when batching (truncation, padding) are ignored: `encode`
returns every token of the text. A `tokenizer_config.json` next to the file, if any,
supplies what tokenizer.json does not hold: the EOS token and the chat template.
"""

import json
from pathlib import Path

import regex

from lucidlm.errors import ModelFileError, UnsupportedError
from lucidlm.tokenizers.bpe import TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED, BPETokenizer
from lucidlm.tokenizers.normalize import normalizer_from_json
from lucidlm.tokenizers.pretokenize import bert_split, pre_tokenizer_from_json
from lucidlm.tokenizers.sentencepiece_bpe import (
    BYTE_PIECE,
    TOKEN_TYPE_BYTE,
    Metaspace,
    SentencePieceBPETokenizer,
)
from lucidlm.tokenizers.whole_tokens import WholeTokens
from lucidlm.tokenizers.wordpiece import WordPieceTokenizer


def read_tokenizer_json(path: str | Path) -> tuple[dict, dict]:
    """(tokenizer.json contents, tokenizer_config.json contents or {}) for a file or its directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a readable tokenizer.json ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise ModelFileError(f"{path}: not a tokenizer.json (no 'model' object)")
    config_path = path.with_name("tokenizer_config.json")
    config = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{config_path}: not readable JSON ({e})") from None
    return spec, config


def tokenizer_from_json(spec: dict, config: dict | None = None, source: str = "tokenizer.json"):
    """The tokenizer a parsed tokenizer.json describes (`config`: its tokenizer_config.json)."""
    config = config or {}
    model = spec["model"]
    kind = model.get("type")
    try:
        if kind == "WordPiece":
            tokenizer = _wordpiece(spec)
        elif kind == "BPE":
            tokenizer = _byte_level_bpe(spec) if _is_byte_level(spec) else _sentencepiece_bpe(spec)
        else:
            raise UnsupportedError(f"tokenizer model {kind!r} is not supported (supported: BPE, WordPiece)")
    except UnsupportedError as e:
        raise UnsupportedError(f"{source}: {e}") from None
    except (KeyError, TypeError, ValueError, IndexError, regex.error) as e:
        raise ModelFileError(f"{source}: malformed tokenizer.json ({type(e).__name__}: {e})") from None
    eos = _token_text(config.get("eos_token"))
    if eos is not None and tokenizer.piece_to_id(eos) is not None:
        tokenizer.eos_id = tokenizer.piece_to_id(eos)
    template = config.get("chat_template")
    tokenizer.chat_template = template if isinstance(template, str) else None
    return tokenizer


# ----- shared parts -----


def _token_text(value) -> str | None:
    """A tokenizer_config.json token entry: a string or {"content": string}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _vocabulary(spec: dict) -> list[str]:
    """The tokens by id: the model's vocabulary plus the added tokens."""
    vocab = spec["model"]["vocab"]
    if isinstance(vocab, list):  # some writers store [token, score] pairs
        vocab = {entry[0]: index for index, entry in enumerate(vocab)}
    by_id: dict[int, str] = {int(index): token for token, index in vocab.items()}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
    size = max(by_id) + 1 if by_id else 0
    if len(by_id) != size:
        missing = next(index for index in range(size) if index not in by_id)
        raise ModelFileError(f"the vocabulary has no token with id {missing} (ids must be 0..{size - 1})")
    return [by_id[index] for index in range(size)]


def _added(spec: dict) -> list[dict]:
    added = spec.get("added_tokens") or []
    for token in added:
        if token.get("single_word"):
            raise UnsupportedError(f"added token {token['content']!r} is 'single_word', which is not supported")
    return added


def _whole_tokens(added: list[dict]) -> WholeTokens:
    # Added tokens marked "normalized" are matched in the normalized text by the reference;
    # we match all of them in the raw text, which only differs if the normalizer changes them.
    return WholeTokens({token["content"]: int(token["id"]) for token in added},
                       lstrip=frozenset(token["content"] for token in added if token.get("lstrip")),
                       rstrip=frozenset(token["content"] for token in added if token.get("rstrip")))


def _token_types(tokens: list[str], added: list[dict], byte_fallback: bool = False) -> list[int]:
    types = [TOKEN_TYPE_NORMAL] * len(tokens)
    if byte_fallback:
        for index, token in enumerate(tokens):
            if BYTE_PIECE.fullmatch(token):
                types[index] = TOKEN_TYPE_BYTE
    for token in added:
        types[int(token["id"])] = TOKEN_TYPE_CONTROL if token.get("special") else TOKEN_TYPE_USER_DEFINED
    return types


def _template_ids(spec: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids before the text, ids after it) that the post-processor adds to a single sequence."""
    return _processor_ids(spec.get("post_processor"))


def _processor_ids(processor: dict | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if processor is None:
        return (), ()
    kind = processor.get("type")
    if kind == "Sequence":
        prefix, suffix = (), ()
        for part in processor["processors"]:
            before, after = _processor_ids(part)
            prefix, suffix = before + prefix, suffix + after
        return prefix, suffix
    if kind == "ByteLevel":
        return (), ()  # it only adjusts offsets
    if kind in ("BertProcessing", "RobertaProcessing"):
        return (int(processor["cls"][1]),), (int(processor["sep"][1]),)
    if kind == "TemplateProcessing":
        prefix: list[int] = []
        suffix: list[int] = []
        seen_text = False
        for item in processor["single"]:
            if "Sequence" in item:
                seen_text = True
                continue
            ids = processor["special_tokens"][item["SpecialToken"]["id"]]["ids"]
            (suffix if seen_text else prefix).extend(int(i) for i in ids)
        return tuple(prefix), tuple(suffix)
    raise UnsupportedError(f"unsupported post-processor {kind!r}")


def _check_bpe_options(model: dict) -> None:
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise UnsupportedError(f"BPE option {option}={model[option]!r} is not supported")


def _merges(model: dict) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs; files store them as "left right" strings or as pairs."""
    return [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in model.get("merges", [])]


def _parts(spec: dict | None, kind: str) -> list[dict]:
    """The components of type `kind` in a (possibly Sequence) pipeline entry."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        children = spec.get("pretokenizers") or spec.get("normalizers") or spec.get("decoders") or []
        return [part for child in children for part in _parts(child, kind)]
    return [spec] if spec.get("type") == kind else []


# ----- the three families -----


def _is_byte_level(spec: dict) -> bool:
    return bool(_parts(spec.get("pre_tokenizer"), "ByteLevel"))


def _byte_level_bpe(spec: dict) -> BPETokenizer:
    model = spec["model"]
    _check_bpe_options(model)
    tokens = _vocabulary(spec)
    added = _added(spec)
    prefix, suffix = _template_ids(spec)
    if len(prefix) > 1 or len(suffix) > 1:
        raise UnsupportedError("a byte-level BPE post-processor adding more than one token on a side is not supported")
    return BPETokenizer(
        tokens,
        [" ".join(pair) for pair in _merges(model)],
        _token_types(tokens, added),
        pre_tokenizer_from_json(spec.get("pre_tokenizer")),
        bos_id=prefix[0] if prefix else None,
        eos_id=suffix[0] if suffix else None,
        add_bos=bool(prefix),
        add_eos=bool(suffix),
        unk_id=_id_of(tokens, model.get("unk_token")),
        normalizer=normalizer_from_json(spec.get("normalizer")),
        ignore_merges=bool(model.get("ignore_merges", False)),
        whole_tokens=_whole_tokens(added),
    )


def _sentencepiece_bpe(spec: dict) -> SentencePieceBPETokenizer:
    model = spec["model"]
    _check_bpe_options(model)
    tokens = _vocabulary(spec)
    added = _added(spec)
    prefix, suffix = _template_ids(spec)
    byte_fallback = bool(model.get("byte_fallback", False))
    metaspace = None
    pre_tokenizer = spec.get("pre_tokenizer")
    if pre_tokenizer is not None:
        parts = _parts(pre_tokenizer, "Metaspace")
        if len(parts) != 1 or (pre_tokenizer.get("type") == "Sequence" and len(pre_tokenizer["pretokenizers"]) != 1):
            raise UnsupportedError(f"pre-tokenizer {pre_tokenizer.get('type')!r} is not supported for this BPE")
        metaspace = _metaspace(parts[0])
    # The decoder drops the space prefix again: Llama 2 with a Strip step, Metaspace by itself.
    decoder = spec.get("decoder")
    strip = any(part.get("content") == " " and part.get("start", 0) >= 1 for part in _parts(decoder, "Strip"))
    strip = strip or any(_metaspace(part).prepend_scheme != "never" for part in _parts(decoder, "Metaspace"))
    unk_id = _id_of(tokens, model.get("unk_token"))
    return SentencePieceBPETokenizer(
        tokens,
        _token_types(tokens, added, byte_fallback),
        merges=_merges(model),
        normalizer=normalizer_from_json(spec.get("normalizer")),
        metaspace=metaspace,
        bos_id=prefix[0] if prefix else None,
        eos_id=suffix[-1] if suffix else None,
        unk_id=unk_id,
        prefix_ids=prefix,
        suffix_ids=suffix,
        byte_fallback=byte_fallback,
        ignore_merges=bool(model.get("ignore_merges", False)),
        strip_leading_space=strip,
        whole_tokens=_whole_tokens(added),
    )


def _metaspace(spec: dict) -> Metaspace:
    if spec.get("replacement", "\u2581") != "\u2581":
        raise UnsupportedError(f"Metaspace replacement {spec['replacement']!r} is not supported")
    scheme = spec.get("prepend_scheme")
    if scheme is None:  # files written before prepend_scheme existed
        scheme = "always" if spec.get("add_prefix_space", True) else "never"
    return Metaspace(prepend_scheme=scheme, split=spec.get("split", True))


def _wordpiece(spec: dict) -> WordPieceTokenizer:
    model = spec["model"]
    tokens = _vocabulary(spec)
    added = _added(spec)
    prefix, suffix = _template_ids(spec)
    pre_tokenizer = spec.get("pre_tokenizer")
    split = bert_split if pre_tokenizer and pre_tokenizer.get("type") == "BertPreTokenizer" else (
        pre_tokenizer_from_json(pre_tokenizer).split)
    decoder = spec.get("decoder") or {}
    unk_id = _id_of(tokens, model.get("unk_token", "[UNK]"))
    if unk_id is None:
        raise ModelFileError(f"the unknown token {model.get('unk_token')!r} is not in the vocabulary")
    return WordPieceTokenizer(
        tokens,
        unk_id=unk_id,
        normalizer=normalizer_from_json(spec.get("normalizer")),
        pre_tokenizer=split,
        whole_tokens=_whole_tokens(added),
        special_ids=frozenset(int(token["id"]) for token in added if token.get("special")),
        prefix_ids=prefix,
        suffix_ids=suffix,
        continuing_prefix=model.get("continuing_subword_prefix", "##"),
        max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        cleanup=bool(decoder.get("cleanup", True)),
        pad_id=_id_of(tokens, (spec.get("padding") or {}).get("pad_token")),
    )


def _id_of(tokens: list[str], token: str | None) -> int | None:
    if token is None:
        return None
    try:
        return tokens.index(token)
    except ValueError:
        return None
