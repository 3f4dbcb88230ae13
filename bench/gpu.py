"""LucidLM on a CUDA GPU: correctness against Hugging Face transformers, speed, and a profile.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python bench/gpu.py --out "$OUT" [--sections decode]

No weights are downloaded: the script builds a random checkpoint shaped like SmolLM2-135M
(Llama, vocab 49152, d_model 576, d_ff 1536, 30 layers, 9 heads / 3 KV heads, RoPE base 1e5,
tied embeddings) with transformers itself, saved as bfloat16 safetensors, plus a tiny
byte-level tokenizer.json so that `lucidlm.load(dir)` also works on it. Then, by section:

1. correctness: logits of LucidLM vs transformers on one random 64-token input, float32 (TF32
   off) and bfloat16, and greedy 32-token continuations;
2. speed, bfloat16, batch 1: prefill at 128 and 512 tokens, decode of 128 greedy tokens
   (LucidLM's `generate_tokens`, a bare LucidLM loop, transformers' `generate`, a bare
   transformers loop with past_key_values), and the memory-bandwidth bound for decode;
3. decode (bench/gpu_decode.py): LucidLM eager vs CUDA-graph decode (`compile_decode`, with and
   without Inductor) vs transformers' `generate` and its compiled static-cache `generate`: speed,
   first-call (compile + capture) time, correctness against eager, profiles of a graphed step;
4. profile (bench/gpu_profile.py): a torch.profiler table of one eager decode step (LucidLM, and
   transformers for comparison);
5. api: `lucidlm.load(..., device=...)` and `run_benchmark` on the device.

`--sections decode` (comma-separated) runs only the sections named; `--skip` leaves some out.
Everything printed also lands in OUT/gpu_results.json and OUT/profile_*.txt.
`--tiny --device cpu` runs the same code on a 2-layer model, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from gpu_common import (RESULTS, compare, copy_bandwidth, decode_prompt, first_divergence, free, hf_generate_run,
                        hf_greedy, hf_model, log, lucid_decode_run, lucid_greedy, lucid_model, make_checkpoint,
                        median_time, sync, top2_margin, unique_param_bytes)
from gpu_decode import decode
from gpu_profile import profile


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

@torch.inference_mode()
def speed(directory: Path, device: torch.device, vocab: int, repeats: int, new_tokens: int) -> None:
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

    prompt = decode_prompt(vocab)
    section["decode_prompt_tokens"] = len(prompt)
    x = torch.tensor([prompt], device=device)
    rates_tok_s = section.setdefault("decode_tok_s", {})

    def lucid_generate() -> float:
        """generate_tokens, timed from the first token to the last (as lucidlm.benchmark does)."""
        return lucid_decode_run(lucid, prompt, new_tokens)["tok_s"]

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
        return hf_generate_run(hf, x, n, device)[0]

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
        rates_tok_s[name] = statistics.median(rates)
        log(f"decode {name:24s} {rates_tok_s[name]:8.1f} tok/s  (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    hf_generate(new_tokens), hf_generate(1)  # warm-up
    full = statistics.median([hf_generate(new_tokens) for _ in range(repeats)])
    one = statistics.median([hf_generate(1) for _ in range(repeats)])
    rates_tok_s["hf_generate"] = (new_tokens - 1) / (full - one)
    section["hf_generate_seconds"] = {"128_tokens": full, "1_token": one}
    log(f"decode {'hf_generate':24s} {rates_tok_s['hf_generate']:8.1f} tok/s  "
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
                            "lucid_generate_pct_of_bound": 100 * rates_tok_s["lucid_generate_tokens"] / bound,
                            "lucid_bare_pct_of_bound": 100 * rates_tok_s["lucid_bare_loop"] / bound}
    log(f"weights read per token {weights / 2**20:.1f} MiB (transformers' model: {hf_weights / 2**20:.1f} MiB); "
        f"1 GiB copy bandwidth {bandwidth / 1e9:.0f} GB/s -> bound {bound:.0f} tok/s; LucidLM decode = "
        f"{section['bandwidth']['lucid_generate_pct_of_bound']:.1f} % of it")
    free(lucid, hf)


# ----- 5. the public entry points on the GPU ------------------------------------------

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


SECTIONS = ("correctness", "speed", "decode", "profile", "api")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/ckpt", help="checkpoint directory (created if absent)")
    parser.add_argument("--out", default=os.environ.get("OUT", "lucid-out/gpu"), help="where results go")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="2-layer model: a quick check of this script")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, in this order: {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = set(filter(None, args.sections.split(","))) - set(filter(None, args.skip.split(",")))
    unknown = chosen - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; known: {','.join(SECTIONS)}")

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
    RESULTS["sections"] = [name for name in SECTIONS if name in chosen]
    sections = (("correctness", lambda: correctness(directory, device, vocab)),
                ("speed", lambda: speed(directory, device, vocab, args.repeats, args.new_tokens)),
                ("decode", lambda: decode(directory, device, vocab, args.repeats, args.new_tokens, out)),
                ("profile", lambda: profile(directory, device, vocab, out)),
                ("api", lambda: public_api(directory, device)))
    assert tuple(name for name, _ in sections) == SECTIONS
    for name, fn in sections:
        if name not in chosen:
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
    if RESULTS.get("errors"):  # also the failures a section recorded and went on from
        status = 1
        log("errors:", RESULTS["errors"])
    log(f"done; results in {out / 'gpu_results.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
