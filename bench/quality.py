"""What the fast numeric paths cost in quality: KL divergence from the exact float32 reference.

    .venv-peers/bin/python bench/quality.py --tokens 1000 --write bench/RESULTS.md

Reference: LucidLM with dtype="float32", every weight dequantized from the GGUF to float32
(its logits equal HF transformers' on the same file to ~1e-4; tests/test_models_*.py).
For each position of a 1,000-token English text, the next-token distribution of each
candidate is compared with the reference's: mean KL(reference || candidate) in nats, and how
often the most likely token is the same. Candidates: LucidLM "packed" (the CPU default:
4-bit weights as stored, int8 LM head) and "bfloat16", and llama.cpp on the same file
(its own quantized kernels, which also quantize activations to 8 bits). "packed, compiled
decode" feeds the text one token at a time through `compile=True` decode steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lucidlm.kernels import cpu_decode
from lucidlm.models import packed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import MODELS, prompt_ids, write_section  # noqa: E402


def kl_and_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """reference, candidate: (T, V) logits -> (mean KL(ref || cand), top-1 agreement)."""
    p = torch.log_softmax(reference.double(), dim=-1)
    q = torch.log_softmax(candidate.double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(dim=-1)
    return kl.mean().item(), (reference.argmax(-1) == candidate.argmax(-1)).double().mean().item()


def lucid_logits(model_name: str, ids: list[int], dtype: str) -> torch.Tensor:
    import lucidlm

    return lucidlm.load(model_name, dtype=dtype, progress=False).logits(ids)


def lucid_compiled_decode_logits(model_name: str, ids: list[int]) -> torch.Tensor:
    """Packed, compile=True, one token per step through the KV cache: what compiled generation computes."""
    import lucidlm

    model = lucidlm.load(model_name, progress=False, compile=True).model
    with torch.inference_mode():
        cache = model.new_cache(1, len(ids))
        return torch.stack([model(torch.tensor([[token]]), cache)[0, -1] for token in ids])


def llama_cpp_logits(model_name: str, ids: list[int]) -> torch.Tensor:
    import numpy as np
    from llama_cpp import Llama

    from lucidlm.loading.catalogue import resolve

    llm = Llama(str(resolve(model_name)), n_ctx=len(ids) + 8, n_batch=512, logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    rows = ["| model | candidate | mean KL from float32 (nats) | top-1 agreement |", "|---|---|---|---|"]
    for model in args.models:
        name = MODELS[model]
        ids = prompt_ids(name, args.tokens)
        reference = lucid_logits(name, ids, "float32")
        candidates = {"LucidLM packed (default)": lambda: lucid_logits(name, ids, "packed"),
                      "LucidLM bfloat16": lambda: lucid_logits(name, ids, "bfloat16"),
                      "LucidLM packed, compiled decode": lambda: lucid_compiled_decode_logits(name, ids)}
        try:
            import llama_cpp  # noqa: F401

            candidates["llama.cpp"] = lambda: llama_cpp_logits(name, ids)
        except ImportError:
            print("llama-cpp-python is not installed: run `make bench-peers` (or use .venv-peers)", file=sys.stderr)
        for label, run in candidates.items():
            kl, agree = kl_and_agreement(reference, run())
            rows.append(f"| {model} | {label} | {kl:.5f} | {agree:.1%} |" if kl >= 1e-4 else
                        f"| {model} | {label} | {kl:.1e} | {agree:.1%} |")
            print(rows[-1], flush=True)
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    body = (f"Command: `{command}`; {args.tokens}-token text (docs/walkthrough.md).\n\n" + "\n".join(rows) +
            "\n\nThe issue's bar: a faster numeric path may lose no more than llama.cpp does on the same file. "
            "Where the CPU has AVX-512 VNNI (this run: " + ("yes" if cpu_decode.available() else "no") + "), packed "
            "models keep the 4-bit values and their float16 scales, the 5-bit ones (Gemma's Q5_0) and the "
            "tied Q8_0 head exactly (models/dot_linear.py); Gemma's Q6_K/Q8_0 block matrices are re-rounded "
            "to int8 with a scale per 32 values. Decode steps (the compiled rows) multiply with our integer-dot kernel, which "
            "rounds x to two int8 terms (kernels/cpu_decode.cpp: ~1e-5 of each group's maximum), and attend over "
            "keys and values stored as float16 (the KV cache's dtype there), so they are the float32 model to "
            "within those roundings; the default row runs the text in one pass, whose many-row "
            "matmuls use the same weights decoded to bfloat16 with x rounded to bfloat16 on CPUs with "
            "AVX-512 BF16 (this run: " + ("bfloat16" if packed.DENSE_DTYPE == torch.bfloat16 else "float32") +
            "), and the prompt's attention in bfloat16 blocks (models/chunked_attention.py). Elsewhere "
            "(PyTorch's weight-only kernels) the scales are bfloat16, the head int8 per row and decode "
            "steps round matmul inputs and outputs to bfloat16 (earlier runs in bench/RESULTS.md's history).")
    print(body)
    if args.write:
        write_section(args.write, "Quality of the fast paths (bench/quality.py)", body)


if __name__ == "__main__":
    main()
