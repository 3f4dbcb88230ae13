"""bench/gpu.py, section 3: decode speed of LucidLM's decode paths and transformers', in one
process, on the same random checkpoint: bfloat16, batch 1, the 128-token prompt of
`decode_prompt`, greedy, `--new-tokens` (128) new tokens, medians of `--repeats` calls after warm-up.

    lucid_eager               generate_tokens on the plain model
    lucid_graphs              compile_decode(model, inductor=False): every decode step replayed from
                              a CUDA graph captured per KV cache (at its first decode step)
    lucid_graphs_inductor     compile_decode(model, inductor=True): the forward compiled by
                              torch.compile (Inductor) first, then captured the same way
    hf_generate               transformers' model.generate (DynamicCache, eager)
    hf_generate_static        model.generate(..., cache_implementation="static"): on CUDA, transformers
                              then runs the decode steps through torch.compile(model.__call__) with its
                              default CompileConfig (Inductor, mode "reduce-overhead" = CUDA graphs)

LucidLM's rates count from the first new token to the last (generate_tokens timed per token);
transformers' is (n - 1) / (time of generate(n) - time of generate(1)). The first call of a
compiled path is timed on its own (compilation + capture); every later call of a graphed path
captures once more, for its new cache, and that is inside the measured rate.
Correctness of the LucidLM paths against lucid_eager: greedy ids (first divergence, with eager's
top-2 logit margin there) and teacher-forced logits over 32 decode steps. Numbers of lucid_eager
and hf_generate measured by section 2 (same prompt, same process) are reused when it ran.
On a CPU the CUDA-only runs (transformers' compiled static path, graphed-step profiles) are
skipped; compile_decode(inductor=False) is eager there, inductor=True is the CPU torch.compile path.
"""

from __future__ import annotations

import statistics
import traceback
from pathlib import Path

import torch

from gpu_common import (RESULTS, compare, copy_bandwidth, decode_prompt, first_divergence, free, hf_generate_run,
                        hf_model, log, lucid_decode_run, lucid_model, top2_margin, unique_param_bytes)
from gpu_profile import profile_step

CHECK_STEPS = 32  # greedy ids compared, and teacher-forced decode steps


def _without_ids(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "ids"}


def _runs_summary(runs: list[dict]) -> dict:
    """Medians over timed calls of lucid_decode_run."""
    return {"tok_s": statistics.median(r["tok_s"] for r in runs),
            "runs_tok_s": [round(r["tok_s"], 2) for r in runs],
            "call_s_median": statistics.median(r["call_s"] for r in runs),
            "ttft_ms_median": 1e3 * statistics.median(r["ttft_s"] for r in runs),
            "first_decode_step_ms_median": statistics.median(r["first_gap_ms"] for r in runs),
            "steady_step_ms_median": statistics.median(r["median_gap_ms"] for r in runs)}


@torch.inference_mode()
def teacher_forced(model, prompt: list[int], tokens: list[int], device: torch.device) -> torch.Tensor:
    """Logits (1 + len(tokens), V), float32 on the CPU: the prefill's last position, then one
    decode step per token fed (the given tokens, not the model's own choices)."""
    # One spare position, as generate_tokens leaves (its last token is never fed back): a step that
    # fills a cache's last slot recompiles the CPU torch.compile path (a guard on the cache's length).
    cache = model.new_cache(1, len(prompt) + len(tokens) + 1)
    rows = [model(torch.tensor([prompt], device=device), cache, last_only=True)[:, -1].float().cpu()]
    for t in tokens:
        # .cpu() copies at once: a graph replay's output buffer is overwritten by the next replay.
        rows.append(model(torch.tensor([[t]], device=device), cache)[:, -1].float().cpu())
    return torch.cat(rows)


def _simple_attributes(obj) -> dict:
    fields = vars(obj) if hasattr(obj, "__dict__") else {}
    return {k: v for k, v in fields.items() if v is None or isinstance(v, (str, int, float, bool))}


def _dynamo_stats() -> dict:
    try:
        from torch._dynamo.utils import counters
        return {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break") and v}
    except Exception as e:  # private API: report, never fail on it
        return {"unavailable": repr(e)}


def _inductor_cache() -> dict:
    """Where Inductor keeps compiled code on disk, and whether it held anything before this section:
    with a warm cache a "first call" compiles in seconds, not tens of seconds."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        directory = Path(cache_dir())
        return {"dir": str(directory), "had_files_before": directory.is_dir() and any(directory.iterdir())}
    except Exception as e:  # private API: report, never fail on it
        return {"unavailable": repr(e)}


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"


# ----- the LucidLM paths --------------------------------------------------------------

def eager_reference(directory: Path, device: torch.device, prompt: list[int], new_tokens: int,
                    repeats: int) -> tuple[dict, list[int], torch.Tensor]:
    """lucid_eager: its rate (from section 2 when it ran), its ids and its teacher-forced logits."""
    model = lucid_model(directory, torch.bfloat16, device)
    entry: dict = {}
    reused = RESULTS.get("speed", {}).get("decode_tok_s", {}).get("lucid_generate_tokens")
    first = lucid_decode_run(model, prompt, new_tokens)  # warm-up, and the reference ids
    if reused is not None:
        entry = {"tok_s": reused, "source": "section speed (lucid_generate_tokens)", "this_call": _without_ids(first)}
    else:
        entry = {**_runs_summary([lucid_decode_run(model, prompt, new_tokens) for _ in range(repeats)]),
                 "source": "measured here"}
    ids = first["ids"]
    logits = teacher_forced(model, prompt, ids[:CHECK_STEPS], device)
    entry["weight_bytes"] = unique_param_bytes(model)
    log(f"decode lucid_eager {entry['tok_s']:8.1f} tok/s ({entry['source']})")
    return entry, ids, logits


def graphed_path(entry: dict, name: str, inductor: bool, directory: Path, device: torch.device, prompt: list[int],
                 new_tokens: int, repeats: int, ref_ids: list[int], ref_logits: torch.Tensor, out: Path) -> None:
    """One LucidLM decode path through compile_decode on a fresh model: timing, correctness, profile,
    recorded in `entry` as they come (what was measured stays there if a later step fails)."""
    from lucidlm.compile import compile_decode

    entry["call"] = f"compile_decode(model, progress=False, inductor={inductor})"
    model = lucid_model(directory, torch.bfloat16, device)
    wrapper = compile_decode(model, progress=False, inductor=inductor)
    if device.type != "cuda":
        entry["note"] = "CPU: no CUDA graphs" + ("; the CPU torch.compile path" if inductor else "; eager")

    first = lucid_decode_run(model, prompt, new_tokens)  # compilation (inductor) + this cache's capture
    entry["state_after_first_call"] = getattr(wrapper, "state", None)
    entry["first_call_s"] = first["call_s"]  # compilation (inductor=True) + capture, plus one ordinary call
    entry["first_call"] = _without_ids(first)
    log(f"{name}: first call {first['call_s']:.2f} s (prefill {first['ttft_s'] * 1e3:.0f} ms, first decode step "
        f"{first['first_gap_ms']:.0f} ms, then {first['tok_s']:.1f} tok/s); "
        f"wrapper state {entry['state_after_first_call']!r}")
    second = lucid_decode_run(model, prompt, new_tokens)  # warm-up
    entry["second_call"] = _without_ids(second)
    runs = [lucid_decode_run(model, prompt, new_tokens) for _ in range(repeats)]
    entry.update(_runs_summary(runs))
    entry["wrapper"] = _simple_attributes(wrapper)
    log(f"decode {name:22s} {entry['tok_s']:8.1f} tok/s (runs: {', '.join(map(str, entry['runs_tok_s']))}); "
        f"call {entry['call_s_median'] * 1e3:.0f} ms (first call {first['call_s'] * 1e3:.0f} ms); per step: "
        f"first {entry['first_decode_step_ms_median']:.1f} ms{' (eager step + capture)' if device.type == 'cuda' else ''}, then "
        f"{entry['steady_step_ms_median']:.2f} ms")

    # Correctness against lucid_eager (the first call's ids: the one that compiled and captured).
    ids = first["ids"]
    d = first_divergence(ids[:CHECK_STEPS], ref_ids[:CHECK_STEPS])
    entry["greedy"] = {
        "ids": ids[:CHECK_STEPS], "equal": d is None, "first_divergence": d,
        "eager_top2_margin_at_divergence": None if d is None else top2_margin(ref_logits[d]),
        f"first_divergence_in_{new_tokens}": first_divergence(ids, ref_ids),
        "same_ids_every_call": all(r["ids"] == ids for r in [second] + runs)}
    log(f"{name}: greedy {CHECK_STEPS} ids equal to eager: {d is None}"
        + ("" if d is None else f" (first divergence {d}, eager's top-2 margin there "
                                f"{entry['greedy']['eager_top2_margin_at_divergence']:.4f})")
        + f"; first divergence in {new_tokens}: {entry['greedy'][f'first_divergence_in_{new_tokens}']}; "
        f"same ids every call: {entry['greedy']['same_ids_every_call']}")
    logits = teacher_forced(model, prompt, ref_ids[:CHECK_STEPS], device)
    entry["teacher_forced_logits"] = compare(f"{name}: teacher-forced logits, {CHECK_STEPS} decode steps, vs eager",
                                             logits[1:], ref_logits[1:], 5e-2, 5e-2)
    entry["state"] = getattr(wrapper, "state", None)
    if inductor:
        entry["dynamo_counters_so_far"] = _dynamo_stats()

    if device.type == "cuda":
        try:
            entry["profile"] = profile_graphed_step(name, model, prompt, device, out)
        except Exception as e:
            entry["profile"] = {"error": _error(e)}
            log(f"{name}: profile failed: {_error(e)}")


def profile_graphed_step(name: str, model, prompt: list[int], device: torch.device, out: Path) -> dict:
    """torch.profiler over one decode step that replays a graph (the cache advances every call:
    a captured step may not be rewound the way section 4 rewinds the eager one)."""
    cache = model.new_cache(1, len(prompt) + 40)  # 5 warm-up + 1 profiled + 2 + 20 timed steps
    with torch.inference_mode():
        token = [model(torch.tensor([prompt], device=device), cache, last_only=True)[:, -1].argmax(-1).view(1, 1)]

    @torch.inference_mode()
    def step() -> int:
        token[0] = model(token[0], cache)[:, -1].argmax(-1).view(1, 1)
        return int(token[0][0, 0])

    holder: dict = {}
    return profile_step(f"{name}_decode_step", step, device, out, holder)


# ----- transformers -------------------------------------------------------------------

def hf_paths(directory: Path, device: torch.device, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """hf_generate (reused from section 2 when it ran) and hf_generate_static."""
    hf = hf_model(directory, torch.bfloat16, device)
    x = torch.tensor([prompt], device=device)
    entries: dict = {}
    reused = RESULTS.get("speed", {}).get("decode_tok_s", {}).get("hf_generate")
    _, default_ids = hf_generate_run(hf, x, new_tokens, device)  # warm-up; ids for the static path
    if reused is not None:
        entries["hf_generate"] = {"tok_s": reused, "source": "section speed (hf_generate)"}
    else:
        hf_generate_run(hf, x, 1, device)
        full = statistics.median(hf_generate_run(hf, x, new_tokens, device)[0] for _ in range(repeats))
        one = statistics.median(hf_generate_run(hf, x, 1, device)[0] for _ in range(repeats))
        entries["hf_generate"] = {"tok_s": (new_tokens - 1) / (full - one), "call_s_median": full,
                                  "one_token_call_s_median": one, "source": "measured here"}
    log(f"decode hf_generate {entries['hf_generate']['tok_s']:8.1f} tok/s ({entries['hf_generate']['source']})")

    if device.type != "cuda":
        entries["hf_generate_static"] = {"skipped": "CUDA only (transformers compiles generate's forward on GPUs)"}
        log("hf_generate_static: skipped (CUDA only)")
        free(hf)
        return entries
    entry: dict = {"call": 'generate(..., cache_implementation="static"), default compile_config'}
    entries["hf_generate_static"] = entry
    try:
        static = {"cache_implementation": "static"}
        first_s, ids = hf_generate_run(hf, x, new_tokens, device, **static)  # compiles the decode forward
        entry["first_call_s"] = first_s
        entry["compiled_forward"] = getattr(hf, "_compiled_call", None) is not None
        config = getattr(hf, "_last_compile_config", None) or getattr(hf.generation_config, "compile_config", None)
        entry["compile_config"] = None if config is None else repr(config)
        log(f"hf_generate_static: first call {first_s:.2f} s (compile); compiled forward: {entry['compiled_forward']}; "
            f"config {entry['compile_config']}")
        entry["second_call_s"] = hf_generate_run(hf, x, new_tokens, device, **static)[0]  # warm-up
        hf_generate_run(hf, x, 1, device, **static)
        fulls = [hf_generate_run(hf, x, new_tokens, device, **static) for _ in range(repeats)]
        ones = [hf_generate_run(hf, x, 1, device, **static)[0] for _ in range(repeats)]
        full, one = statistics.median(s for s, _ in fulls), statistics.median(ones)
        entry.update(tok_s=(new_tokens - 1) / (full - one), call_s_median=full, one_token_call_s_median=one,
                     runs_call_s=[round(s, 4) for s, _ in fulls],
                     first_divergence_from_hf_generate=first_divergence(ids, default_ids),
                     same_ids_every_call=all(i == ids for _, i in fulls),
                     dynamo_counters_so_far=_dynamo_stats())
        log(f"decode {'hf_generate_static':22s} {entry['tok_s']:8.1f} tok/s (generate {new_tokens} tokens "
            f"{full * 1e3:.1f} ms - 1 token {one * 1e3:.1f} ms; second call {entry['second_call_s']:.2f} s); "
            f"ids vs hf_generate: first divergence {entry['first_divergence_from_hf_generate']}")
    except Exception as e:
        entry["error"] = _error(e)
        RESULTS.setdefault("errors", {})["decode.hf_generate_static"] = entry["error"]
        log(f"hf_generate_static failed: {entry['error']}")
        traceback.print_exc()
    free(hf)
    return entries


# ----- the section --------------------------------------------------------------------

def decode(directory: Path, device: torch.device, vocab: int, repeats: int, new_tokens: int, out: Path) -> None:
    section = RESULTS.setdefault("decode", {})
    prompt = decode_prompt(vocab)
    section["setup"] = {"dtype": "bfloat16", "batch": 1, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
                        "repeats": repeats, "greedy": True, "check_steps": CHECK_STEPS,
                        "inductor_cache": _inductor_cache()}
    log("decode setup:", section["setup"])
    paths = section.setdefault("paths", {})

    eager, ref_ids, ref_logits = eager_reference(directory, device, prompt, new_tokens, repeats)
    paths["lucid_eager"] = eager
    free()
    for name, inductor in (("lucid_graphs", False), ("lucid_graphs_inductor", True)):
        paths[name] = {}
        try:
            graphed_path(paths[name], name, inductor, directory, device, prompt, new_tokens, repeats,
                         ref_ids, ref_logits, out)
        except Exception as e:
            paths[name]["error"] = _error(e)
            RESULTS.setdefault("errors", {})[f"decode.{name}"] = _error(e)
            log(f"ERROR in {name}: {_error(e)}")
            traceback.print_exc()
        free()
    paths.update(hf_paths(directory, device, prompt, new_tokens, repeats))

    bandwidth = RESULTS.get("speed", {}).get("bandwidth")
    if bandwidth is None:
        bw = copy_bandwidth(device)
        bandwidth = {"weight_bytes_per_token": eager["weight_bytes"], "copy_bandwidth_GBps": bw / 1e9,
                     "bound_tok_s": bw / eager["weight_bytes"], "source": "measured here"}
    section["bandwidth"] = bandwidth
    bound = bandwidth["bound_tok_s"]
    base = paths["hf_generate"].get("tok_s")
    summary = section["summary"] = {}
    lines = []
    for name, entry in paths.items():
        rate = entry.get("tok_s")
        if rate is None:
            summary[name] = {"tok_s": None, "why": entry.get("error") or entry.get("skipped")}
            lines.append(f"  {name:22s}        -  ({summary[name]['why']})")
            continue
        summary[name] = {"tok_s": rate, "x_hf_generate": rate / base if base else None,
                         "pct_of_bound": 100 * rate / bound,
                         "first_call_s": entry.get("first_call_s"),
                         "later_call_s": entry.get("call_s_median")}
        first = summary[name]["first_call_s"]
        lines.append(f"  {name:22s} {rate:8.1f} tok/s  {summary[name]['x_hf_generate'] or 0:6.2f}x hf_generate  "
                     f"{summary[name]['pct_of_bound']:6.2f} % of bound"
                     + ("" if first is None else f"  first call {first:.2f} s")
                     + ("" if entry.get("call_s_median") is None else f", later calls {entry['call_s_median']:.2f} s")
                     + ("" if "error" not in entry else f"  (then failed: {entry['error']})"))
    log(f"decode summary (bf16, batch 1, {len(prompt)}-token prompt, {new_tokens} new tokens, median of {repeats}; "
        f"bound {bound:.0f} tok/s = {bandwidth['copy_bandwidth_GBps']:.0f} GB/s / "
        f"{bandwidth['weight_bytes_per_token'] / 2**20:.1f} MiB):\n" + "\n".join(lines))
