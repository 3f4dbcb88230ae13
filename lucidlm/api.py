"""The Python API: a loaded model with its tokenizer, and the calls users make on it.

    m = lucidlm.load()                      # the default model (SmolLM2-135M-Instruct)
    m.tokenizer.encode("Hello")             # -> [19556]
    m.logits([19556, 905])                  # -> float32 tensor (T, V)
    for piece in m.stream("The capital of France is", max_new_tokens=20):
        print(piece, end="")
    m.chat([{"role": "user", "content": "What is the capital of France?"}])

Generation defaults to greedy decoding (temperature 0); any temperature > 0 samples.
After each generate/stream/chat call `m.last_stats` holds token counts and timings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch

from .errors import InvalidArgumentError
from .generate import GenerationStats, TextStream, generate_tokens
from .loading.catalogue import resolve
from .loading.load import load_gguf
from .sampling import SamplingParams, make_sampler
from .tokenizers import IncrementalDecoder
from .tokenizers.chat import render_chat

# Tokens that end a turn or a document in the common vocabularies; any present in the
# vocabulary stops generation, in addition to the file's own EOS id.
END_OF_TEXT_MARKERS = ("<|endoftext|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "</s>")


class LucidModel:
    def __init__(self, model: torch.nn.Module, tokenizer, name: str, path: Path | None = None,
                 metadata: dict | None = None, tensor_types: dict | None = None):
        self.model, self.tokenizer, self.name, self.path = model, tokenizer, name, path
        self.metadata = metadata or {}
        self.tensor_types = tensor_types or {}
        self.last_stats = GenerationStats()

    @property
    def config(self):
        return self.model.config

    def __repr__(self) -> str:
        return f"LucidModel({self.name!r}, {self.config.architecture}, {self.config.n_layers} layers)"

    @property
    def stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set()
        for marker in END_OF_TEXT_MARKERS:
            token_id = self.tokenizer.piece_to_id(marker)
            if token_id is not None and self.tokenizer.is_special(token_id):
                ids.add(token_id)
        return ids

    @torch.inference_mode()
    def logits(self, ids, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits: a list of ids -> (T, V); a (B, T) tensor -> (B, T, V).

        `valid` (B, T) bool marks real tokens in a left-padded batch.
        """
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return self.model(ids.long(), valid=valid)
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        if ids.numel() == 0:
            raise InvalidArgumentError("no token ids given")
        return self.model(ids[None])[0]

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: str | list[str] | None = None, use_cache: bool = True) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece as tokens are generated."""
        started = time.perf_counter()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("the prompt is empty")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        steps = generate_tokens(self.model, prompt_ids, make_sampler(params), max_new_tokens,
                                stop_ids=self.stop_ids, use_cache=use_cache)
        self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        return iter(TextStream(steps, IncrementalDecoder(self.tokenizer), self.stop_ids, stops,
                               self.last_stats, started))

    def generate(self, prompt: str | list[int], **kwargs) -> str:
        """The completion of `prompt` (without the prompt). Keyword arguments as for `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        tok = self.tokenizer
        return render_chat(tok.chat_template, messages, add_generation_prompt,
                           bos_token=tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else "",
                           eos_token=tok.id_to_piece(tok.eos_id) if tok.eos_id is not None else "")

    def stream_chat(self, messages: list[dict], **kwargs) -> Iterator[str]:
        """Yield the assistant's reply to `messages`, rendered with the model's chat template."""
        return self.stream(self.tokenizer.encode(self.apply_chat_template(messages)), **kwargs)

    def chat(self, messages: list[dict], **kwargs) -> str:
        return "".join(self.stream_chat(messages, **kwargs))


def load(name_or_path: str | None = None, progress: bool = True) -> LucidModel:
    """Load a model by catalogue name (default: smollm2-135m-instruct) or GGUF file path."""
    path = resolve(name_or_path)
    loaded = load_gguf(path, progress=progress)
    return LucidModel(loaded.model, loaded.tokenizer, name_or_path or path.stem, path,
                      loaded.metadata, loaded.tensor_types)
