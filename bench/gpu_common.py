"""Shared by bench/gpu.py, bench/gpu_decode.py and bench/gpu_profile.py: the results record,
timing (decode runs of both engines, copy bandwidth), the random SmolLM2-shaped checkpoint (with a
byte-level tokenizer.json) and model builders."""

from __future__ import annotations

import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch

RESULTS: dict = {}  # everything measured, written to OUT/gpu_results.json
START = time.perf_counter()


def log(*parts) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s]", *parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    seconds = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy of a 1 GiB tensor (64 MiB on a CPU): (bytes read + written) / seconds."""
    if device.type != "cuda":
        n = 1 << 26
        src = torch.empty(n, dtype=torch.uint8)
        dst = torch.empty_like(src)
        return 2 * n / median_time(lambda: dst.copy_(src), device, 5)
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def decode_prompt(vocab: int, length: int = 128) -> list[int]:
    """The prompt every decode measurement uses: `length` random ids (seed 99)."""
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(99)).tolist()


def lucid_decode_run(model, prompt: list[int], n: int) -> dict:
    """One `generate_tokens` call (greedy, no stop ids), with a timestamp per token.

    Each step's id was read with int(), so the GPU is synchronised when a step is yielded.
    tok_s counts from the first token to the last (prefill and first token excluded, as
    lucidlm.benchmark does); call_s is the whole call, prefill included; gaps are the times
    between consecutive tokens (gap 0 is the cache's first decode step).
    """
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    started = time.perf_counter()
    stamps, ids = [], []
    for step in generate_tokens(model, prompt, make_sampler(SamplingParams()), n, stop_ids=()):
        stamps.append(time.perf_counter())
        ids.append(step.token_id)
    assert len(ids) == n, len(ids)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tok_s": (n - 1) / (stamps[-1] - stamps[0]), "call_s": stamps[-1] - started,
            "ttft_s": stamps[0] - started, "first_gap_ms": gaps[0] * 1e3 if gaps else None,
            "median_gap_ms": statistics.median(gaps) * 1e3 if gaps else None, "ids": ids}


def hf_generate_run(model, x: torch.Tensor, n: int, device: torch.device, **kwargs) -> tuple[float, list[int]]:
    """Wall seconds of one transformers `generate` of exactly n greedy tokens, and the new ids."""
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, **kwargs)
    sync(device)
    seconds = time.perf_counter() - t0
    assert out.shape[1] == x.shape[1] + n, out.shape
    return seconds, out[0, x.shape[1]:].tolist()


# ----- the checkpoint -----------------------------------------------------------------

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_byte_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json covering the model's whole vocabulary: 256 byte tokens,
    one merge, then two-byte pieces up to vocab_size - 1 (decodable, never produced by encoding:
    a random model emits any id, and decoding an id the tokenizer lacks fails), <|endoftext|> last.
    Only so that `lucidlm.load(directory)` (which reads a tokenizer) can be exercised."""
    chars = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["Ġt"] = 256
    pairs = (a + b for a in chars for b in chars)
    while len(vocab) < vocab_size - 1:
        piece = next(pairs)
        if piece not in vocab:
            vocab[piece] = len(vocab)
    eos = len(vocab)
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {**vocab, "<|endoftext|>": eos}, "merges": [["Ġ", "t"]]},
    }
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}), encoding="utf-8")


def make_checkpoint(directory: Path, tiny: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        log(f"checkpoint {directory} exists, reusing it")
        return
    directory.mkdir(parents=True, exist_ok=True)
    shape = TINY_SHAPE if tiny else SMOLLM2_SHAPE
    config = LlamaConfig(**shape, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, hidden_act="silu")
    torch.manual_seed(0)
    build_device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(build_device):
        model = LlamaForCausalLM(config)  # transformers' own init: normal(0, 0.02), norms = 1
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    write_byte_tokenizer(directory, shape["vocab_size"])
    del model
    log(f"wrote random {'tiny' if tiny else 'SmolLM2-135M-shaped'} checkpoint to {directory}:",
        sorted(p.name for p in directory.iterdir()))


# ----- helpers ------------------------------------------------------------------------

def unique_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter tensor (the tied LM head counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def lucid_model(directory: Path, dtype: torch.dtype, device: torch.device):
    from lucidlm.loading.hf import load_hf

    model = load_hf(directory, dtype=dtype, progress=False).model
    model.compute_dtype = dtype  # what lucidlm.api.load does: activations and KV cache follow the weights
    return model.to(device)


def hf_model(directory: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    model.eval()
    return model


def free(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> dict:
    diff = (actual.float() - expected.float()).abs()
    entry = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
             "ref_abs_max": expected.abs().max().item(), "atol": atol, "rtol": rtol,
             "argmax_agree": (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()}
    try:
        torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
        entry["assert_close"] = "PASS"
    except AssertionError as e:
        entry["assert_close"] = "FAIL: " + str(e).splitlines()[0] + " | " + " ".join(str(e).split("\n")[1:4])
    log(f"{name}: {entry['assert_close']}; max |diff| {entry['max_abs_diff']:.3g}, mean {entry['mean_abs_diff']:.3g}, "
        f"|ref| max {entry['ref_abs_max']:.3g}, argmax agreement {entry['argmax_agree']:.3f} (atol={atol}, rtol={rtol})")
    return entry


@torch.inference_mode()
def lucid_greedy(model, prompt: list[int], n: int) -> list[int]:
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    return [s.token_id for s in generate_tokens(model, prompt, make_sampler(SamplingParams()), n, stop_ids=())]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int, device) -> tuple[list[int], list[torch.Tensor]]:
    ids = torch.tensor([prompt], device=device)
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # never stop early: LucidLM is run with no stop ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, max_new_tokens=n,
                         do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape[1] == len(prompt) + n, out.sequences.shape
    return out.sequences[0, len(prompt):].tolist(), [s[0].float().cpu() for s in out.scores]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def top2_margin(scores: torch.Tensor) -> float:
    top = scores.topk(2).values
    return (top[0] - top[1]).item()
