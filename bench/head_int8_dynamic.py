"""Could the LM head use FBGEMM's int8 x int8 kernel (dynamically quantized activations)?

    PYTHONPATH=. .venv/bin/python bench/head_int8_dynamic.py [smollm2-135m-instruct | gemma3-270m]

On this AVX2 machine `torch.ops.quantized.linear_dynamic` (FBGEMM: activations quantized to
7-bit per call, integer dot products) runs a (49152 x 576) head 2.5x faster than the int8
weight-only kernel the packed path uses (`torch._weight_int8pack_mm`), and Gemma's (262144 x
640) 2x faster. This script measures what it costs in quality: the mean KL divergence from the
float32 model's next-token distribution over the first 300 tokens of tests/prompts.PASSAGE, with
the packed model's final hidden states fed to (a) the packed head as it is, (b) FBGEMM with one
activation scale per row, (c) the same after folding per-channel activation maxima into the
weights (SmoothQuant, alpha 0.5 / 0.8 / 1.0), (d) FBGEMM per 64- and 32-column group (one
activation scale per group, as llama.cpp's Q8 activation blocks), (e) the two-stage head the
packed path adopted for heads larger than the blocks (`models.packed_head.Int8Head`: FBGEMM
for all tokens, the best 128 / 512 / 1024 recomputed exactly), with the time per row of each.
Results and conclusions: bench/RESULTS.md, "LM head: int8 activations".
"""

from __future__ import annotations

import sys
import time

import torch

sys.path.insert(0, "tests")

import lucidlm  # noqa: E402
from lucidlm.models import packed_head  # noqa: E402
from lucidlm.models.packed import Int8Linear  # noqa: E402
from prompts import PASSAGE  # noqa: E402

torch.set_num_threads(2)


def prepacked(w: torch.Tensor):
    """FBGEMM's packed form of an (N, K) float matrix, int8 with one symmetric scale per row."""
    scale = w.abs().amax(1).clamp(min=1e-12) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    return torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0), None)


def per_row_ms(fn, x: torch.Tensor, repeats: int = 20) -> float:
    for _ in range(3):
        fn(x)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - start) / repeats * 1e3


@torch.inference_mode()
def main(name: str) -> None:
    reference = lucidlm.load(name, progress=False, dtype="float32")
    packed = lucidlm.load(name, progress=False, dtype="packed")
    ids = reference.tokenizer.encode(PASSAGE)[:300]
    expected = torch.log_softmax(reference.model(torch.tensor([ids]))[0].double(), -1)  # (T, V)

    def kl(logits: torch.Tensor) -> float:
        return float((expected.exp() * (expected - torch.log_softmax(logits.double(), -1))).sum(-1).mean())

    captured = {}
    hook = packed.model.norm.register_forward_hook(lambda module, inputs, output: captured.update(h=output))
    packed.model(torch.tensor([ids]))
    hook.remove()
    hidden = captured["h"][0].float()  # (T, C): what the head reads
    head = packed.model.lm_head
    rows = [hidden[t : t + 1] for t in range(len(ids))]
    weight = head.q.float() * head.scale.float()[:, None]  # (V, C), as the packed head holds it
    print(f"{name}: head {tuple(weight.shape)}, |hidden| max {float(hidden.abs().max()):.1f}, "
          f"mean {float(hidden.abs().mean()):.2f}")

    weight_only = lambda x: Int8Linear.kernel_matmul(head, x).float()  # noqa: E731
    print(f"  weight-only int8 kernel (bf16 activations): KL {kl(torch.cat([weight_only(r) for r in rows])):.5f}, "
          f"{per_row_ms(weight_only, rows[0]):.2f} ms per row")
    whole = prepacked(weight)
    fbgemm = lambda x: torch.ops.quantized.linear_dynamic(x, whole, True)  # noqa: E731 (reduce_range: 7-bit)
    print(f"  FBGEMM, one activation scale per row: KL {kl(torch.cat([fbgemm(r) for r in rows])):.5f}, "
          f"{per_row_ms(fbgemm, rows[0]):.2f} ms per row")
    channel_max = hidden.abs().amax(0).clamp(min=1e-5)  # (C,), calibrated on the same text: optimistic
    for alpha in (0.5, 0.8, 1.0):
        factor = channel_max**alpha
        smooth = prepacked(weight * factor)
        logits = torch.cat([torch.ops.quantized.linear_dynamic(r / factor, smooth, True) for r in rows])
        print(f"  FBGEMM after SmoothQuant folding, alpha {alpha}: KL {kl(logits):.5f}")
    for group in (64, 32):
        parts = [prepacked(weight[:, g : g + group]) for g in range(0, weight.shape[1], group)]

        def grouped(x: torch.Tensor, parts=parts, group=group) -> torch.Tensor:
            out = torch.ops.quantized.linear_dynamic(x[:, :group].contiguous(), parts[0], True)
            for i, part in enumerate(parts[1:], start=1):
                out += torch.ops.quantized.linear_dynamic(x[:, i * group : (i + 1) * group].contiguous(), part, True)
            return out

        print(f"  FBGEMM per {group}-column group: KL {kl(torch.cat([grouped(r) for r in rows])):.5f}, "
              f"{per_row_ms(grouped, rows[0]):.2f} ms per row")
    two_stage = packed_head.Int8Head.from_linear(head)
    shipped = packed_head.RESCORED
    for count in (128, 512, 1024):
        packed_head.RESCORED = count  # read at every call
        print(f"  two-stage Int8Head, best {count} exact: KL {kl(torch.cat([two_stage(r) for r in rows])):.5f}, "
              f"{per_row_ms(two_stage, rows[0]):.2f} ms per row")
    packed_head.RESCORED = shipped


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct")
