"""Tokenizers: text <-> token ids, read from a model file's vocabulary.

All of them share one interface (`encode`, `decode`, `token_bytes`, `id_to_piece`, ...):
- BPETokenizer: byte-level BPE (GPT-2, SmolLM2, Qwen 2, Llama 3) from GGUF or tokenizer.json;
- SentencePieceBPETokenizer: SentencePiece-style BPE with byte fallback (Gemma, Llama 2);
- WordPieceTokenizer: BERT's WordPiece, from tokenizer.json;
- TiktokenTokenizer: byte-level BPE from a `.tiktoken` file (cl100k_base).
`load_tokenizer(source)` picks the right one for a GGUF, tokenizer.json, .tiktoken or short name.
"""

from lucidlm.tokenizers.bpe import BPETokenizer
from lucidlm.tokenizers.registry import TOKENIZER_NAMES, load_tokenizer, tokenizer_from_gguf_metadata
from lucidlm.tokenizers.sentencepiece_bpe import SentencePieceBPETokenizer
from lucidlm.tokenizers.streaming import IncrementalDecoder
from lucidlm.tokenizers.tiktoken_file import TiktokenTokenizer
from lucidlm.tokenizers.wordpiece import WordPieceTokenizer

__all__ = [
    "BPETokenizer",
    "IncrementalDecoder",
    "SentencePieceBPETokenizer",
    "TOKENIZER_NAMES",
    "TiktokenTokenizer",
    "WordPieceTokenizer",
    "load_tokenizer",
    "tokenizer_from_gguf_metadata",
]
