"""Tokenizers: text <-> token ids, read from a model file's vocabulary."""

from lucidlm.tokenizers.bpe import BPETokenizer
from lucidlm.tokenizers.streaming import IncrementalDecoder

__all__ = ["BPETokenizer", "IncrementalDecoder"]
