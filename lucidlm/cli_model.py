"""The model options every `lucid` command that loads a model shares: --model, --dtype, --device, --compile."""

from __future__ import annotations

import argparse

MODEL_HELP = "catalogue name, GGUF path or Hugging Face directory (default: smollm2-135m-instruct)"


def add_model_args(p: argparse.ArgumentParser, default: str | None = None, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", "-m", default=default, help=help)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "packed"),
                   help="weights/activations: packed = 4-bit/int8 weights (fast, small; the default for GGUF "
                        "on CPU), float32 = exact reference arithmetic, bfloat16 (default on GPU)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (a GPU if PyTorch sees one)")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile (and on a GPU replay them from CUDA graphs): "
                        "faster tokens after a one-off compilation (about a minute the first time, cached on disk)")


def load_model(args, name: str | None = None, compile: bool | None = None):
    """Load `name` (default: --model) with the command's --dtype, --device and --compile (unless
    `compile` overrides it: an embedding model has no decode step to compile)."""
    from .api import load

    return load(name if name is not None else args.model, dtype=getattr(args, "dtype", "auto"),
                device=getattr(args, "device", "cpu"), compile=getattr(args, "compile", False) if compile is None else compile)
