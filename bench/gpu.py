"""LucidLM on a CUDA GPU: correctness against Hugging Face transformers, speed, and a profile.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python bench/gpu.py --out "$OUT"

No weights are downloaded: the script builds a random checkpoint shaped like SmolLM2-135M
(Llama, vocab 49152, d_model 576, d_ff 1536, 30 layers, 9 heads / 3 KV heads, RoPE base 1e5,
tied embeddings) with transformers itself, saved as bfloat16 safetensors, plus a tiny
byte-level tokenizer.json so that `lucidlm.load(dir)` also works on it. Then:

1. correctness: logits of LucidLM vs transformers on one random 64-token input, float32 (TF32
   off) and bfloat16, and greedy 32-token continuations;
2. speed, bfloat16, batch 1: prefill at 128 and 512 tokens, decode of 128 greedy tokens
   (LucidLM's `generate_tokens`, a bare LucidLM loop, transformers' `generate`, a bare
   transformers loop with past_key_values), and the memory-bandwidth bound for decode;
3. a torch.profiler table of one decode step (LucidLM, and transformers for comparison).

Everything printed also lands in OUT/gpu_results.json and OUT/profile_*.txt.
`--tiny --device cpu` runs the same code on a 2-layer model, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS: dict = {}
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


# ----- 1. correctness -----------------------------------------------------------------

@torch.inference_mode()
def correctness(directory: Path, device: torch.device, vocab: int) -> None:
    section = RESULTS.setdefault("correctness", {})
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab, (1, 64), generator=gen)
    prompt = tokens[0, :16].tolist()
    section["input"] = "random 64 token ids (seed 1234); greedy prompt = its first 16 ids"

    # float32, TF32 off (PyTorch's default for CUDA matmuls, but make it explicit).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    section["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    section["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    log("float32 correctness: TF32 off, matmul precision", section["float32_matmul_precision"])
    lucid, hf = lucid_model(directory, torch.float32, device), hf_model(directory, torch.float32, device)
    x = tokens.to(device)
    ref32 = hf(x).logits.float()
    ours = lucid(x)
    section["fp32_logits"] = compare("fp32 logits, LucidLM vs transformers (no cache)", ours, ref32, 1e-4, 1e-4)
    cached = lucid(x, lucid.new_cache(1, 64))
    section["fp32_logits_cached"] = compare("fp32 logits, LucidLM with KV cache vs transformers", cached, ref32, 1e-4, 1e-4)
    # Incremental: 48 tokens prefilled, then 16 one at a time, against the full pass.
    cache = lucid.new_cache(1, 64)
    parts = [lucid(x[:, :48], cache)] + [lucid(x[:, t:t + 1], cache) for t in range(48, 64)]
    section["fp32_logits_incremental"] = compare("fp32 logits, LucidLM prefill 48 + 16 single steps vs transformers",
                                                 torch.cat(parts, dim=1), ref32, 1e-4, 1e-4)
    ours32_ids = lucid_greedy(lucid, prompt, 32)
    hf32_ids, hf32_scores = hf_greedy(hf, prompt, 32, device)
    d = first_divergence(ours32_ids, hf32_ids)
    section["fp32_greedy"] = {"lucid": ours32_ids, "hf": hf32_ids, "equal": ours32_ids == hf32_ids,
                              "first_divergence": d,
                              "hf_top2_margin_at_divergence": None if d is None else top2_margin(hf32_scores[d])}
    log(f"fp32 greedy 32 tokens equal: {ours32_ids == hf32_ids}; first divergence {d}; lucid {ours32_ids[:12]}...")
    ref32_cpu = ref32.cpu()
    free(lucid, hf, ref32, ours, cached, parts)

    # bfloat16: both engines against each other, and both against the float32 reference.
    lucid, hf = lucid_model(directory, torch.bfloat16, device), hf_model(directory, torch.bfloat16, device)
    ours16, ref16 = lucid(x).float().cpu(), hf(x).logits.float().cpu()
    section["bf16_logits"] = compare("bf16 logits, LucidLM vs transformers", ours16, ref16, 5e-2, 5e-2)
    section["bf16_lucid_vs_fp32"] = compare("bf16 LucidLM vs fp32 reference", ours16, ref32_cpu, 1e-1, 1e-1)
    section["bf16_hf_vs_fp32"] = compare("bf16 transformers vs fp32 reference", ref16, ref32_cpu, 1e-1, 1e-1)
    ours_ids = lucid_greedy(lucid, prompt, 32)
    hf_ids, hf_scores = hf_greedy(hf, prompt, 32, device)
    d = first_divergence(ours_ids, hf_ids)
    section["bf16_greedy"] = {"lucid": ours_ids, "hf": hf_ids, "equal": ours_ids == hf_ids, "first_divergence": d,
                              "hf_top2_margin_at_divergence": None if d is None else top2_margin(hf_scores[d]),
                              "lucid_bf16_equals_fp32_greedy": ours_ids == ours32_ids,
                              "hf_bf16_equals_fp32_greedy": hf_ids == hf32_ids}
    log(f"bf16 greedy 32 tokens equal: {ours_ids == hf_ids}; first divergence {d}"
        + ("" if d is None else f" (transformers' top-2 logit margin there {section['bf16_greedy']['hf_top2_margin_at_divergence']:.4f})")
        + f"; LucidLM bf16 == fp32 greedy: {ours_ids == ours32_ids}; transformers bf16 == fp32 greedy: {hf_ids == hf32_ids}")
    free(lucid, hf)


# ----- 2. speed -----------------------------------------------------------------------

def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy of a 1 GiB tensor: (bytes read + bytes written) / seconds."""
    if device.type != "cuda":
        n = 1 << 26
        a = torch.empty(n, dtype=torch.uint8)
        b = torch.empty_like(a)
        t = median_time(lambda: b.copy_(a), device, 5)
        return 2 * n / t
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


@torch.inference_mode()
def speed(directory: Path, device: torch.device, vocab: int, repeats: int, new_tokens: int) -> None:
    from lucidlm.generate import generate_tokens
    from lucidlm.sampling import SamplingParams, make_sampler

    section = RESULTS.setdefault("speed", {"repeats": repeats, "new_tokens": new_tokens})
    lucid, hf = lucid_model(directory, torch.bfloat16, device), hf_model(directory, torch.bfloat16, device)
    gen = torch.Generator().manual_seed(99)
    section["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)

    # Prefill, logits of the last position only (what generation needs).
    prefill = section.setdefault("prefill_tok_s", {})
    for n in (128, 512):
        x = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        caches = [lucid.new_cache(1, n) for _ in range(repeats + 2)]
        it = iter(caches)
        t_lucid = median_time(lambda: lucid(x, next(it), last_only=True), device, repeats, warmup=2)
        t_hf = median_time(lambda: hf(x, use_cache=True, logits_to_keep=1), device, repeats, warmup=2)
        prefill[n] = {"lucid": n / t_lucid, "hf": n / t_hf, "lucid_ms": t_lucid * 1e3, "hf_ms": t_hf * 1e3}
        log(f"prefill {n:4d} tokens: LucidLM {n / t_lucid:9.0f} tok/s ({t_lucid * 1e3:.2f} ms), "
            f"transformers {n / t_hf:9.0f} tok/s ({t_hf * 1e3:.2f} ms)")

    prompt = torch.randint(0, vocab, (128,), generator=gen).tolist()
    section["decode_prompt_tokens"] = len(prompt)
    x = torch.tensor([prompt], device=device)
    decode = section.setdefault("decode_tok_s", {})

    def lucid_generate() -> float:
        """generate_tokens, timed from the first token to the last (as lucidlm.benchmark does)."""
        steps = generate_tokens(lucid, prompt, make_sampler(SamplingParams()), new_tokens, stop_ids=())
        next(steps)  # prefill + first token (its id was read with int(): the GPU is synchronised)
        t0 = time.perf_counter()
        count = 1 + sum(1 for _ in steps)
        assert count == new_tokens, count
        return (count - 1) / (time.perf_counter() - t0)

    def lucid_bare() -> float:
        """The model alone: forward + argmax + int(), no sampler object, no log-softmax per step."""
        cache = lucid.new_cache(1, len(prompt) + new_tokens)
        nxt = lucid(x, cache, last_only=True)[:, -1].argmax(-1)
        int(nxt[0])
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            nxt = lucid(nxt.view(1, 1), cache)[:, -1].argmax(-1)
            int(nxt[0])
        return (new_tokens - 1) / (time.perf_counter() - t0)

    def hf_generate(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        sync(device)
        assert out.shape[1] == len(prompt) + n, out.shape
        return time.perf_counter() - t0

    def hf_bare() -> float:
        out = hf(x, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        int(nxt[0, 0])
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = hf(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            int(nxt[0, 0])
        return (new_tokens - 1) / (time.perf_counter() - t0)

    for name, fn in (("lucid_generate_tokens", lucid_generate), ("lucid_bare_loop", lucid_bare),
                     ("hf_bare_loop", hf_bare)):
        fn()  # warm-up
        rates = [fn() for _ in range(repeats)]
        decode[name] = statistics.median(rates)
        log(f"decode {name:24s} {decode[name]:8.1f} tok/s  (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    hf_generate(new_tokens), hf_generate(1)  # warm-up
    full = statistics.median([hf_generate(new_tokens) for _ in range(repeats)])
    one = statistics.median([hf_generate(1) for _ in range(repeats)])
    decode["hf_generate"] = (new_tokens - 1) / (full - one)
    section["hf_generate_seconds"] = {"128_tokens": full, "1_token": one}
    log(f"decode {'hf_generate':24s} {decode['hf_generate']:8.1f} tok/s  "
        f"(generate {new_tokens} tokens {full * 1e3:.1f} ms - 1 token {one * 1e3:.1f} ms)")

    # Host cost of one tiny kernel launch (eager PyTorch): the floor under every op of a decode step.
    if device.type == "cuda":
        tiny = torch.zeros(16, device=device)
        for _ in range(100):
            tiny.add_(1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(2000):
            tiny.add_(1)
        launch = (time.perf_counter() - t0) / 2000
        sync(device)
        section["host_us_per_tiny_op"] = launch * 1e6
        log(f"host cost of one eager tiny op (x.add_(1), 2000 in a row): {launch * 1e6:.1f} us")

    weights = unique_param_bytes(lucid)
    hf_weights = unique_param_bytes(hf)
    bandwidth = copy_bandwidth(device)
    bound = bandwidth / weights
    section["bandwidth"] = {"weight_bytes_per_token": weights, "hf_weight_bytes": hf_weights,
                            "copy_bandwidth_GBps": bandwidth / 1e9, "bound_tok_s": bound,
                            "lucid_generate_pct_of_bound": 100 * decode["lucid_generate_tokens"] / bound,
                            "lucid_bare_pct_of_bound": 100 * decode["lucid_bare_loop"] / bound}
    log(f"weights read per token {weights / 2**20:.1f} MiB (transformers' model: {hf_weights / 2**20:.1f} MiB); "
        f"1 GiB copy bandwidth {bandwidth / 1e9:.0f} GB/s -> bound {bound:.0f} tok/s; LucidLM decode = "
        f"{section['bandwidth']['lucid_generate_pct_of_bound']:.1f} % of it")
    free(lucid, hf)


# ----- 3. profile ---------------------------------------------------------------------

@torch.inference_mode()
def profile(directory: Path, device: torch.device, vocab: int, out: Path) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    section = RESULTS.setdefault("profile", {})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prompt = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(7)).to(device)
    device_key = "self_device_time_total"

    def run(name: str, step) -> None:
        for _ in range(5):
            step()  # warm-up (allocator, cuBLAS handles, rope tables)
        sync(device)
        with torch_profile(activities=activities) as prof:
            step()
            sync(device)
        averages = prof.key_averages()
        try:
            by_device = averages.table(sort_by=device_key, row_limit=15)
        except Exception:  # older naming
            by_device = averages.table(sort_by="self_cuda_time_total", row_limit=15)
        by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=15)
        (out / f"profile_{name}_by_device_time.txt").write_text(by_device)
        (out / f"profile_{name}_by_cpu_time.txt").write_text(by_cpu)
        try:
            prof.export_chrome_trace(str(out / f"trace_{name}.json"))
        except Exception as e:
            log("chrome trace not written:", e)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_busy_us = sum(e.device_time for e in kernels) if kernels else 0.0
        wall = median_time(step, device, 20, warmup=2)
        cpu_ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
        entry = {"kernels_per_step": len(kernels), "gpu_kernel_time_us": gpu_busy_us, "wall_ms_per_step": wall * 1e3,
                 "cpu_ops_recorded": len(cpu_ops),
                 "gpu_busy_pct_of_wall": 100 * gpu_busy_us / 1e3 / (wall * 1e3) if wall else None}
        section[name] = entry
        log(f"profile {name}: {len(kernels)} kernels, GPU kernel time {gpu_busy_us:.0f} us, wall {wall * 1e3:.2f} ms "
            f"per step (unprofiled median of 20) -> GPU busy {entry['gpu_busy_pct_of_wall'] or 0:.0f} % of the step")
        print(f"\n--- {name}: top 15 by self device time ---\n{by_device}\n--- {name}: top 15 by self CPU time ---\n{by_cpu}",
              flush=True)

    lucid = lucid_model(directory, torch.bfloat16, device)
    cache = lucid.new_cache(1, 128 + 64)
    nxt = lucid(prompt, cache, last_only=True)[:, -1].argmax(-1)

    def lucid_step():
        # One decode position. The cache pointer is rewound so every call decodes position 128.
        cache.length = 128
        logits = lucid(nxt.view(1, 1), cache)[:, -1]
        return int(logits.argmax(-1)[0])

    run("lucid_decode_step", lucid_step)
    if device.type == "cuda":
        # Would the eager decode step survive CUDA-graph capture (the usual cure for launch overhead)?
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        token = nxt.view(1, 1).clone()
        try:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                cache.length = 128
                lucid(token, cache)
            torch.cuda.current_stream().wait_stream(stream)
            cache.length = 128
            with torch.cuda.graph(graph):
                lucid(token, cache)
            section["cuda_graph_capture"] = "captured (note: a replay would keep the captured position/shapes)"
        except Exception as e:
            section["cuda_graph_capture"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            torch.cuda.synchronize()
        log("CUDA-graph capture of a LucidLM decode step:", section["cuda_graph_capture"])
    free(lucid, cache)

    from transformers import DynamicCache

    hf = hf_model(directory, torch.bfloat16, device)
    base = hf(prompt, use_cache=True, logits_to_keep=1)
    nxt_hf = base.logits[:, -1].argmax(-1, keepdim=True)
    past = base.past_key_values

    def hf_step():
        out_ = hf(nxt_hf, past_key_values=past, use_cache=True)
        token = int(out_.logits[:, -1].argmax(-1)[0])
        past.crop(-1)  # drop the position just added: every call decodes position 128, as above
        return token

    if not isinstance(past, DynamicCache):
        log("transformers cache cannot be cropped; HF profile skipped")
        return
    run("hf_decode_step", hf_step)
    free(hf)


# ----- 4. the public entry points on the GPU ------------------------------------------

def public_api(directory: Path, device: torch.device) -> None:
    """lucidlm.load(dir, dtype="bfloat16", device=...) and lucid bench's run_benchmark on the device."""
    import lucidlm
    from lucidlm.benchmark import run_benchmark

    section = RESULTS.setdefault("public_api", {})
    m = lucidlm.load(str(directory), progress=False, dtype="bfloat16", device=str(device))
    p = next(m.model.parameters())
    cache = m.model.new_cache(1, 8)
    section["load"] = {"param_device": str(p.device), "param_dtype": str(p.dtype),
                       "compute_dtype": str(m.model.compute_dtype), "kv_cache_dtype": str(cache.keys[0].dtype),
                       "kv_cache_device": str(cache.keys[0].device)}
    text = m.generate([5, 6, 7, 8], max_new_tokens=8)
    section["generate_ok"] = True
    section["last_stats"] = m.last_stats.summary()
    log("lucidlm.load(..., dtype='bfloat16', device=...):", section["load"], "| generate ->", repr(text),
        "|", m.last_stats.summary())
    free(m)
    r = run_benchmark(str(directory), runs=3, decode_tokens=64, dtype="bfloat16", device=str(device))
    section["run_benchmark"] = r.to_dict()
    log("lucidlm.benchmark.run_benchmark on the device:\n" + r.table())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/ckpt", help="checkpoint directory (created if absent)")
    parser.add_argument("--out", default=os.environ.get("OUT", "lucid-out/gpu"), help="where results go")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="2-layer model: a quick check of this script")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: correctness,speed,profile,api")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("ERROR: --device cuda asked for but torch.cuda.is_available() is False")
        return 2
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    env["cpu_count"] = os.cpu_count()
    import hashlib

    package = Path(__file__).resolve().parent.parent / "lucidlm"
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        digest.update(file.read_bytes())
    env["lucidlm_py_sha256"] = digest.hexdigest()[:16]
    env["layers_py_sha256"] = hashlib.sha256((package / "models" / "layers.py").read_bytes()).hexdigest()[:16]
    RESULTS["env"] = env
    log("environment:", env)

    try:
        import lucidlm  # noqa: F401
        import lucidlm.generate  # noqa: F401
        import lucidlm.loading.hf  # noqa: F401
    except ImportError as e:
        log(f"ERROR: import lucidlm failed: {e!r}")
        traceback.print_exc()
        return 3
    log("import lucidlm OK; third-party modules loaded:",
        sorted({m.split('.')[0] for m in sys.modules} & {"gguf", "matplotlib", "numpy", "regex", "jinja2",
                                                          "safetensors", "fastapi"}))

    directory = Path(args.ckpt)
    make_checkpoint(directory, args.tiny)
    from lucidlm.loading.hf import read_config
    from lucidlm.loading.hf_names import llama_config

    cfg = llama_config(read_config(directory))
    RESULTS["lucid_config"] = repr(cfg)
    log("LucidLM reads the config as", cfg)
    if cfg.rope_base != 100000.0 or not cfg.tie_embeddings or cfg.norm_eps != 1e-5:
        log("ERROR: config.json not read as written (rope base / tying / eps)")
        return 4
    vocab = cfg.vocab_size

    status = 0
    sections = (("correctness", lambda: correctness(directory, device, vocab)),
                ("speed", lambda: speed(directory, device, vocab, args.repeats, args.new_tokens)),
                ("profile", lambda: profile(directory, device, vocab, out)),
                ("api", lambda: public_api(directory, device)))
    for name, fn in sections:
        if name in skip:
            continue
        log(f"===== {name} =====")
        try:
            fn()
        except Exception as e:
            status = 1
            RESULTS.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            log(f"ERROR in {name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            (out / "gpu_results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    log(f"done; results in {out / 'gpu_results.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
