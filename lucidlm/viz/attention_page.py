"""A self-contained interactive HTML page of a prompt's attention patterns.

One file, no network: the weights are embedded as JSON and the page's JavaScript is
inline (the template is attention_page.html next to this file). Hovering a token colours
the tokens it attends to; selects choose the layer and the head (or the mean of the heads).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch

TEMPLATE = Path(__file__).with_name("attention_page.html")


def attention_page(patterns: torch.Tensor, tokens: list[str], title: str, path: str | Path,
                   layer: int = 0, head: int | str = "mean") -> Path:
    """patterns (L, H, T, T) for all layers and heads; tokens: the T token texts.
    `layer` and `head` are what the page shows first."""
    L, H, T, _ = patterns.shape
    # Causal: row q has weights only for keys 0..q, so store just those (half the size), 4 decimals.
    rows = [[[[round(w, 4) for w in patterns[l, h, q, : q + 1].tolist()] for q in range(T)]
             for h in range(H)] for l in range(L)]
    data = {"title": title, "tokens": tokens, "n_layers": L, "n_heads": H, "layer": layer, "head": head,
            "patterns": rows}
    # "<" escaped so no token text can close the <script> element the JSON sits in.
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    values = {"TITLE": html.escape(title), "DATA": payload}
    # One pass, so a marker inside the title or the tokens is never itself replaced.
    page = re.sub(r"__(TITLE|DATA)__", lambda m: values[m.group(1)], TEMPLATE.read_text(encoding="utf-8"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
