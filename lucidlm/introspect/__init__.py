"""Looking inside a model: hook points, activation capture, logit lens, attention and embeddings.

    logits, cache = m.run_with_cache("The capital of France is")
    cache["blocks.3.attn.hook_pattern"]           # (B, H, T, S) attention weights of layer 3
    m.run_with_hooks(ids, hooks={"blocks.3.attn.hook_z": zero_head_5})

Hook names follow TransformerLens; `hook_point.HOOK_SITES` lists every site with its shape.
This package's top level imports nothing from the model code (which imports `hook_point`).
"""

from .activation_cache import ActivationCache
from .capture import as_token_batch, hooks_attached, run_with_cache, run_with_hooks, select_hook_names
from .hook_point import HOOK_SITES, HookPoint, hook_names, hook_points, hook_sites
from .lens import LensReading, lens_logits, logit_lens

__all__ = ["ActivationCache", "HOOK_SITES", "HookPoint", "LensReading", "as_token_batch", "hook_names",
           "hook_points", "hook_sites", "hooks_attached", "lens_logits", "logit_lens", "run_with_cache", "run_with_hooks",
           "select_hook_names"]
