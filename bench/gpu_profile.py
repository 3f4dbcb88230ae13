"""bench/gpu.py, section 4: a torch.profiler table of one decode step (LucidLM, and transformers
for comparison), written to OUT/profile_*.txt. `profile_step` also profiles the graphed decode
steps of section 3 (bench/gpu_decode.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from gpu_common import RESULTS, free, hf_model, log, lucid_model, median_time, sync

# ----- 4. profile ---------------------------------------------------------------------

def profile_step(name: str, step, device: torch.device, out: Path, section: dict, warmup: int = 5,
                 wall_repeats: int = 20) -> dict:
    """Profile one call of `step` (after `warmup` calls), write its tables to OUT/profile_<name>_*.txt
    and its trace to OUT/trace_<name>.json, then time `wall_repeats` unprofiled calls.
    `step` is called warmup + 1 + 2 + wall_repeats times in all."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(warmup):
        step()  # warm-up (allocator, cuBLAS handles, rope tables; a graph's capture)
    sync(device)
    with torch_profile(activities=activities) as prof:
        step()
        sync(device)
    averages = prof.key_averages()
    try:
        by_device = averages.table(sort_by="self_device_time_total", row_limit=15)
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
    wall = median_time(step, device, wall_repeats, warmup=2)
    cpu_ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    entry = {"kernels_per_step": len(kernels), "gpu_kernel_time_us": gpu_busy_us, "wall_ms_per_step": wall * 1e3,
             "cpu_ops_recorded": len(cpu_ops),
             "gpu_busy_pct_of_wall": 100 * gpu_busy_us / 1e3 / (wall * 1e3) if wall else None}
    section[name] = entry
    log(f"profile {name}: {len(kernels)} kernels, GPU kernel time {gpu_busy_us:.0f} us, wall {wall * 1e3:.2f} ms "
        f"per step (unprofiled median of {wall_repeats}) -> GPU busy {entry['gpu_busy_pct_of_wall'] or 0:.0f} % of the step")
    print(f"\n--- {name}: top 15 by self device time ---\n{by_device}\n--- {name}: top 15 by self CPU time ---\n{by_cpu}",
          flush=True)
    return entry


@torch.inference_mode()
def profile(directory: Path, device: torch.device, vocab: int, out: Path) -> None:
    section = RESULTS.setdefault("profile", {})
    prompt = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(7)).to(device)

    def run(name: str, step) -> None:
        profile_step(name, step, device, out, section)

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
