"""The packed LM head with and without FBGEMM (`models.packed_head.Int8Head`): decode speed, memory.

    PYTHONPATH=. .venv/bin/python bench/head_ab.py gemma3-270m [--compile]
    PYTHONPATH=. .venv/bin/python bench/head_ab.py gemma3-270m --rss old   (then: --rss new)
    PYTHONPATH=. .venv/bin/python bench/head_ab.py gemma3-270m --kl

Decode: greedy generations of 40 tokens from 4 prompts, 4 rounds, the two heads alternating in
one process (the same weights; "old" switches the head's FBGEMM key off, so it takes the int8
weight-only kernel); medians of the 16 tokens/s figures, and whether the texts agree.
Memory (`--rss`): in a fresh process per variant, load, a 512-token prefill and 64 decode steps;
the peak resident set (`ru_maxrss`).
Quality (`--kl`): the packed model decodes bench/quality.py's 1,000-token text one token at a
time; its final hidden states go through the weight-only kernel and through the two-stage head
with several RESCORED counts: mean KL from the float32 model's next-token distributions. Results: bench/RESULTS.md, "LM head: int8 activations".
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

import torch

import lucidlm
from lucidlm.models import packed_head
from lucidlm.models.packed import Int8Linear

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
           "Once upon a time, in a small village,"]


def decode_ab(name: str, compile: bool) -> None:
    model = lucidlm.load(name, progress=False, compile=compile)
    head = model.model.lm_head
    key = getattr(head, "prepacked_key", None)
    if key is None:
        raise SystemExit(f"{name}: the head is a {type(head).__name__} without FBGEMM; nothing to compare")
    speeds, texts = {"old": [], "new": []}, {}
    model.generate("warm up", max_new_tokens=4)
    for round_ in range(4):
        for variant in ("old", "new"):
            head.prepacked_key = None if variant == "old" else key
            for prompt in PROMPTS:
                result = model.generate_detailed(prompt, max_new_tokens=40)
                if round_ == 0:
                    texts.setdefault(prompt, {})[variant] = result.text
                speeds[variant].append(result.stats.decode_tokens_per_second)
    for prompt, both in texts.items():
        print(repr(prompt), "same text" if both["old"] == both["new"] else f"differs:\n  old {both['old']!r}\n  new {both['new']!r}")
    for variant, values in speeds.items():
        print(f"{variant}: median {statistics.median(values):.1f} tok/s of {[round(v, 1) for v in values]}")


def peak_rss(name: str, variant: str) -> None:
    if variant == "old":  # the loader's Int8Head then has no FBGEMM copy at all
        packed_head._prepack = lambda q, scale: None
    model = lucidlm.load(name, progress=False)
    ids = torch.arange(1000, 1512)
    with torch.inference_mode():
        cache = model.model.new_cache(1, 700)
        model.model(ids[None], cache, last_only=True)
        for i in range(64):
            model.model(ids[None, i : i + 1], cache)
    print(f"{name} {variant}: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


@torch.inference_mode()
def kl_by_rescored(name: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from peers import prompt_ids

    ids = prompt_ids(name, 1000)
    reference = torch.log_softmax(lucidlm.load(name, progress=False, dtype="float32").logits(ids).double(), -1)

    def kl(logits: torch.Tensor) -> float:
        return float((reference.exp() * (reference - torch.log_softmax(logits.double(), -1))).sum(-1).mean())

    model = lucidlm.load(name, progress=False).model
    hidden = []
    hook = model.norm.register_forward_hook(lambda module, inputs, output: hidden.append(output[0, -1].float().clone()))
    cache = model.new_cache(1, len(ids))
    for token in ids:
        model(torch.tensor([[token]]), cache)
    hook.remove()
    head = packed_head.Int8Head.from_linear(model.lm_head)
    mass = reference.exp().topk(2048, dim=-1).values
    print(f"{name}: float32 probability mass in the top 512: mean {float(mass[:, :512].sum(-1).mean()):.3f}, "
          f"min {float(mass[:, :512].sum(-1).min()):.3f}; top 2048: mean {float(mass.sum(-1).mean()):.4f}")
    print(f"  weight-only kernel: KL {kl(torch.stack([Int8Linear.kernel_matmul(head, h[None])[0].float() for h in hidden])):.5f}")
    shipped = packed_head.RESCORED
    for count in (512, 1024, 2048, 8192):
        packed_head.RESCORED = count
        print(f"  two stages, best {count} exact: KL {kl(torch.stack([head(h[None])[0] for h in hidden])):.5f}")
    packed_head.RESCORED = shipped


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3-270m")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rss", choices=("old", "new"))
    parser.add_argument("--kl", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.rss:
        peak_rss(args.model, args.rss)
    elif args.kl:
        kl_by_rescored(args.model)
    else:
        decode_ab(args.model, args.compile)
