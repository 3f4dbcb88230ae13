"""The Python API: a loaded model with its tokenizer, and the calls users make on it.

    m = lucidlm.load()                      # the default model (SmolLM2-135M-Instruct)
    m.tokenizer.encode("Hello")             # -> [19556]
    m.logits([19556, 905])                  # -> float32 tensor (T, V)
    for piece in m.stream("The capital of France is", max_new_tokens=20):
        print(piece, end="")
    m.chat([{"role": "user", "content": "What is the capital of France?"}])

Generation defaults to greedy decoding (temperature 0); any temperature > 0 samples.
After each generate/stream/chat call `m.last_stats` holds token counts and timings.

Other strategies and per-token details (see `lucidlm.decoding`):

    m.generate("Once upon a time", num_beams=4)                  # beam search
    m.generate("Once upon a time", penalty_alpha=0.6, top_k=4)   # contrastive search
    g = m.generate_detailed("Once upon a time", temperature=0.7, n=3, logprobs=5)
    g.completions[1].text, g.completions[1].tokens[0].top        # 3 samples, top-5 log-probs
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch

from .compile import compile_decode
from .decoding import DecodingOptions, Generation, decode, token_steps
from .errors import ContextOverflowError, InvalidArgumentError, LucidError
from .generate import GenerationStats, TextStream
from .introspect import ActivationCache, as_token_batch, hook_names, run_with_cache, run_with_hooks
from .loading.catalogue import resolve
from .loading.hf import load_hf, load_tokenizer_for_directory
from .loading.load import load_gguf
from .models.bert import mean_pool
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

    @property
    def is_encoder(self) -> bool:
        """True for encoder-only models (BERT): they embed text, they do not predict tokens."""
        return not hasattr(self.model, "lm_head")

    def _require_decoder(self) -> None:
        if self.is_encoder:
            raise LucidError(f"{self.name} is an encoder ({self.config.architecture}): it makes embeddings "
                             "with embed(), it does not generate text")

    def checked_tokens(self, ids) -> torch.Tensor:
        """Token ids from a caller (a list, or a (T,) or (B, T) tensor) as a long tensor of the same
        shape, checked: integers in [0, vocab_size), 1 to context_length positions. (The embedding
        lookup would wrap a negative id around to the last rows and answer as if nothing were wrong.)"""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (torch.Tensor, list, tuple)):
            raise InvalidArgumentError(f"token ids must be a list or a tensor of integers, got {type(ids).__name__}")
        try:
            tokens = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(list(ids))
        except (TypeError, ValueError, RuntimeError):
            raise InvalidArgumentError("token ids must be integers") from None
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise InvalidArgumentError(f"token ids must be integers, got {tokens.dtype}")
        if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0:
            raise InvalidArgumentError(f"expected token ids of shape (T,) or (B, T) with T >= 1, got {tuple(tokens.shape)}")
        vocab, context = self.config.vocab_size, self.config.context_length
        if bool((tokens < 0).any()) or bool((tokens >= vocab).any()):
            bad = tokens[(tokens < 0) | (tokens >= vocab)][0].item()
            raise InvalidArgumentError(f"token ids must be in [0, {vocab}) for {self.name}, got {bad}")
        if tokens.shape[-1] > context:
            raise ContextOverflowError(f"{tokens.shape[-1]} tokens exceed the model's context length of {context}")
        return tokens.long()

    @torch.inference_mode()
    def logits(self, ids, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits: a list of ids -> (T, V); a (B, T) tensor -> (B, T, V).

        `valid` (B, T) bool marks real tokens in a left-padded batch.
        """
        self._require_decoder()
        tokens = self.checked_tokens(ids)
        if tokens.dim() == 2:
            if valid is not None and (not isinstance(valid, torch.Tensor) or valid.shape != tokens.shape):
                raise InvalidArgumentError(f"valid must be a bool tensor of the tokens' shape {tuple(tokens.shape)}")
            return self.model(tokens, valid=None if valid is None else valid.bool())
        return self.model(tokens[None])[0]

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        self._require_decoder()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise InvalidArgumentError("the prompt is empty")
        if isinstance(prompt, torch.Tensor) or not isinstance(prompt, (list, tuple)):
            raise InvalidArgumentError(f"the prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return self.checked_tokens(prompt).tolist()

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: str | list[str] | None = None, use_cache: bool = True,
               penalty_alpha: float = 0.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: dict[int, float] | None = None, no_repeat_ngram_size: int = 0,
               min_new_tokens: int = 0, max_time: float | None = None, prompt_lookup: int = 0) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece as tokens are generated.

        Greedy, sampling (temperature > 0) or contrastive search (penalty_alpha > 0, with
        top_k candidates). presence/frequency_penalty and logit_bias as in OpenAI's API;
        no_repeat_ngram_size bans repeating any n-gram; stop tokens are held back until
        min_new_tokens tokens exist; max_time (seconds) bounds the whole call. prompt_lookup=k
        guesses up to k tokens by copying what followed the last n-gram earlier in the text and
        checks them in one forward pass: faster where the output repeats its context, same
        output distribution (`lucidlm.prompt_lookup`).
        """
        started = time.perf_counter()
        options = DecodingOptions.from_kwargs(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, use_cache=use_cache,
            penalty_alpha=penalty_alpha, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            logit_bias=logit_bias or {}, no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens,
            max_time=max_time, prompt_lookup=prompt_lookup)
        prompt_ids = self._prompt_ids(prompt)
        steps = token_steps(self.model, prompt_ids, options, self.stop_ids)
        self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids))
        return iter(TextStream(steps, IncrementalDecoder(self.tokenizer), self.stop_ids, list(options.stop),
                               self.last_stats, started))

    def generate(self, prompt: str | list[int], **kwargs) -> str:
        """The completion of `prompt` (without the prompt); for beam search the best one.
        Keyword arguments as for `generate_detailed`."""
        generation = self.generate_detailed(prompt, **kwargs)
        if len(generation.completions) > 1:
            raise InvalidArgumentError(f"{len(generation.completions)} completions were asked for: "
                                       "use generate_detailed to get them all")
        return generation.text

    def generate_detailed(self, prompt: str | list[int], **kwargs) -> Generation:
        """Every completion of `prompt` with its token ids, finish reason, beam score and,
        with `logprobs=K`, each token's log-probability and the K most likely alternatives.

        Keywords: those of `stream`, plus strategy ("greedy", "sample", "beam",
        "contrastive"; inferred when omitted), num_beams, length_penalty, early_stopping
        (True, False or "never", as in Hugging Face), num_return_sequences, n (independent
        samples sharing one prefill) and logprobs. See `lucidlm.decoding`.
        """
        started = time.perf_counter()
        options = DecodingOptions.from_kwargs(**kwargs)
        generation = decode(self, self._prompt_ids(prompt), options, started)
        self.last_stats = generation.stats
        return generation

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


    # ----- looking inside (lucidlm.introspect) -----

    def token_batch(self, text_or_ids) -> torch.Tensor:
        """Text -> its ids as (1, T), special tokens added as the model's metadata asks;
        a list of ids -> (1, T); a (B, T) tensor as it is. On the model's device."""
        if isinstance(text_or_ids, str):
            if not text_or_ids:
                raise InvalidArgumentError("the prompt is empty")
            text_or_ids = self.tokenizer.encode(text_or_ids)
        return as_token_batch(self.checked_tokens(text_or_ids)).to(next(self.model.parameters()).device)

    def hook_names(self) -> list[str]:
        """Every hook point's name, in forward order (`lucidlm.introspect.HOOK_SITES` has their shapes)."""
        return hook_names(self.model)

    def run_with_cache(self, text_or_ids, names=None) -> tuple[torch.Tensor, ActivationCache]:
        """One forward pass capturing activations -> (logits (B, T, V), ActivationCache).

        `names`: None for every hook point, a name, a list of names, or a predicate on names.
        Cached tensors keep the batch dimension, also for a single prompt.
        """
        return run_with_cache(self.model, self.token_batch(text_or_ids), names)

    def run_with_hooks(self, text_or_ids, hooks: dict) -> torch.Tensor:
        """One forward pass with `hooks[name](activation, name)` called at each named site -> logits (B, T, V).

        A hook returning a tensor replaces the activation (same shape); returning None only reads.
        Hooks are removed afterwards, also when the pass raises.
        """
        return run_with_hooks(self.model, self.token_batch(text_or_ids), hooks)

    @torch.inference_mode()
    def embed(self, texts: str | list[str]) -> torch.Tensor:
        """Sentence embeddings (N, C) of an encoder model: the mean of the final hidden states
        over each text's real tokens, L2-normalised, so `a @ b.T` is cosine similarity."""
        if not self.is_encoder:
            raise LucidError(f"{self.name} is a decoder: embed() needs an encoder model such as minilm-l6-v2")
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or any(not isinstance(t, str) or not t for t in texts):
            raise InvalidArgumentError("embed() needs a non-empty list of non-empty strings")
        ids = [self.tokenizer.encode(t) for t in texts]
        longest = max(len(i) for i in ids)
        if longest > self.config.context_length:
            raise ContextOverflowError(f"a text has {longest} tokens; this encoder reads at most "
                                       f"{self.config.context_length}")
        # Right padding: an encoder has no "next token", so padding position does not matter
        # as long as the mask hides it from attention and from the mean.
        tokens = torch.tensor([i + [0] * (longest - len(i)) for i in ids])  # (N, T)
        valid = torch.tensor([[True] * len(i) + [False] * (longest - len(i)) for i in ids])
        return mean_pool(self.model(tokens, valid), valid)


DTYPES = ("auto", "float32", "bfloat16", "packed")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when PyTorch sees a GPU, else the CPU."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise InvalidArgumentError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU here")
    return torch.device(device)


def load(name_or_path: str | None = None, progress: bool = True, dtype: str = "auto",
         device: str = "cpu", compile: bool = False) -> LucidModel:
    """Load a model by catalogue name (default: smollm2-135m-instruct), GGUF file path or Hugging Face
    checkpoint directory.

    dtype: how weights and activations are held.
        "float32"   exact: every weight dequantized to float32 (the reference arithmetic, what
                    the parity tests against HF transformers use);
        "bfloat16"  dense bfloat16 weights and activations;
        "packed"    (GGUF on CPU) 4-bit weights stay 4-bit, other quantized matrices int8,
                    matmuls through PyTorch's int4/int8 CPU kernels (bfloat16 inputs and
                    outputs), float32 activations: the fastest and smallest
                    (see `lucidlm.loading.load` and `lucidlm.models.packed`);
        "auto"      (default) "packed" for GGUF files on the CPU, "bfloat16" for GGUF on a GPU,
                    "float32" for Hugging Face checkpoint directories.
    device: "cpu" (default), "cuda" (or "cuda:N"), or "auto" (a GPU when PyTorch sees one).
    compile: run decode steps through torch.compile (`lucidlm.compile`): faster tokens once
        compiled, at the cost of compiling at the first decode step (about a minute the first
        time, seconds once Inductor's disk cache has it). On a GPU, decode steps are also
        replayed from CUDA graphs (`lucidlm.cuda_graphs`). Introspection stays eager.
    """
    model = _load(name_or_path, progress, dtype, device)
    if compile:
        if model.is_encoder:
            raise InvalidArgumentError("compile=True speeds up decoding; an encoder has no decode step")
        compile_decode(model.model, progress)
    return model


def _load(name_or_path: str | None, progress: bool, dtype: str, device: str) -> LucidModel:
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = resolve_device(device)
    path = resolve(name_or_path)
    if path.is_dir():  # a Hugging Face checkpoint directory (config.json + safetensors)
        if dtype == "packed":
            raise InvalidArgumentError("dtype 'packed' applies to quantized GGUF files; use float32 or bfloat16")
        weights = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        loaded_hf = load_hf(path, dtype=weights, progress=progress)
        loaded_hf.model.compute_dtype = weights  # activations and KV cache follow the weights
        tokenizer = load_tokenizer_for_directory(path, loaded_hf.model.config.vocab_size)
        return LucidModel(loaded_hf.model.to(target), tokenizer, name_or_path or path.name, path, loaded_hf.config)
    if dtype == "auto":
        dtype = "packed" if target.type == "cpu" else "bfloat16"
    if dtype == "packed" and target.type != "cpu":
        raise InvalidArgumentError("dtype 'packed' uses CPU kernels; on a GPU use bfloat16 (or auto)")
    loaded = load_gguf(path, dtype=dtype, progress=progress)
    return LucidModel(loaded.model.to(target), loaded.tokenizer, name_or_path or path.stem, path,
                      loaded.metadata, loaded.tensor_types)
