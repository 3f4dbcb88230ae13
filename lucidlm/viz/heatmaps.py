"""Heatmaps: attention patterns (one head, the layer mean, or all heads in a grid) and the logit lens."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

DPI = 100


def heatmap_figsize(n_rows: int, n_cols: int) -> tuple[float, float]:
    """Inches for one heatmap of n_rows x n_cols cells: room for token labels, bounded for long prompts."""
    return (min(4 + 0.45 * n_cols, 24), min(3.5 + 0.4 * n_rows, 24))


def lens_figsize(n_layers: int, n_positions: int) -> tuple[float, float]:
    return (min(4 + 0.9 * n_positions, 24), min(3 + 0.3 * n_layers, 16))


def grid_figsize(n_heads: int, n_tokens: int) -> tuple[float, float]:
    cols = math.ceil(math.sqrt(n_heads))
    rows = math.ceil(n_heads / cols)
    side = min(2.2 + 0.22 * n_tokens, 6)
    return (min(cols * side + 1.5, 30), min(rows * side + 1, 30))


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Tokens in scripts the default font lacks (CJK, emoji) are drawn as boxes; say nothing.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=DPI)
    return path


def _causal(pattern: torch.Tensor) -> np.ma.MaskedArray:
    """(T, T) weights with the never-attendable upper triangle masked (drawn blank, not as 0)."""
    weights = pattern.float().cpu().numpy()
    return np.ma.masked_where(np.triu(np.ones_like(weights, dtype=bool), k=1), weights)


def _token_axes(ax, labels: list[str], x_label: bool = True, y_label: bool = True) -> None:
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels if x_label else [], rotation=90, fontsize=8)
    ax.set_yticks(ticks, labels if y_label else [], fontsize=8)


def attention_heatmap(pattern: torch.Tensor, labels: list[str], title: str, path: str | Path) -> Path:
    """One (T, T) pattern, rows = query (attending) tokens, columns = key (attended-to) tokens."""
    T = pattern.shape[0]
    fig = Figure(figsize=heatmap_figsize(T, T), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(_causal(pattern), cmap="viridis", vmin=0, vmax=1)
    _token_axes(ax, labels)
    ax.set_xlabel("key token (attended to)")
    ax.set_ylabel("query token (attending)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="attention weight")
    return save(fig, path)


def attention_grid(patterns: torch.Tensor, labels: list[str], title: str, path: str | Path) -> Path:
    """All heads of a layer, patterns (H, T, T), one shared colour scale."""
    H, T = patterns.shape[0], patterns.shape[1]
    cols = math.ceil(math.sqrt(H))
    rows = math.ceil(H / cols)
    fig = Figure(figsize=grid_figsize(H, T), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    show_labels = T <= 16  # beyond that the labels overlap; the single-head picture has them
    for index, ax in enumerate(axes.flat):
        if index >= H:
            ax.set_axis_off()
            continue
        image = ax.imshow(_causal(patterns[index]), cmap="viridis", vmin=0, vmax=1)
        row, col = divmod(index, cols)
        if show_labels:
            _token_axes(ax, labels, x_label=row == rows - 1 or index + cols >= H, y_label=col == 0)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(f"head {index}", fontsize=9)
    fig.supxlabel("key token (attended to)")
    fig.supylabel("query token (attending)")
    fig.suptitle(title, fontsize=11)
    fig.colorbar(image, ax=axes, label="attention weight", shrink=0.8)
    return save(fig, path)


def lens_heatmap(top_probs: torch.Tensor, top_labels: list[list[str]], position_labels: list[str],
                 title: str, path: str | Path) -> Path:
    """Logit lens, layers x positions: colour = probability of the top token read after that
    layer, cell text = that token (only when the cells are big enough to hold it)."""
    L, T = top_probs.shape
    fig = Figure(figsize=lens_figsize(L, T), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(top_probs.float().cpu().numpy(), cmap="magma", vmin=0, vmax=1, aspect="auto", origin="lower")
    if T <= 24:
        for layer in range(L):
            for pos in range(T):
                p = float(top_probs[layer, pos])
                ax.text(pos, layer, top_labels[layer][pos][:10], ha="center", va="center", fontsize=6,
                        color="black" if p > 0.6 else "white")
    ax.set_xticks(range(T), position_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel("input token (the lens predicts the token after it)")
    ax.set_ylabel("layer (residual stream after the block)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="probability of the top token")
    return save(fig, path)
