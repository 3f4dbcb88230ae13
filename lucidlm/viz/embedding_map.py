"""A labelled 2-D scatter of words (from PCA or t-SNE coordinates)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from .heatmaps import save

MAP_FIGSIZE = (8.0, 6.5)


def embedding_map(coords: torch.Tensor, words: list[str], title: str, axis_labels: tuple[str, str],
                  path: str | Path) -> Path:
    """coords (N, 2), one point per word, each labelled with its word. Position is the only
    value shown, so there is no colour bar."""
    xy = coords.float().cpu().numpy()
    fig = Figure(figsize=MAP_FIGSIZE, layout="constrained")
    ax = fig.subplots()
    ax.scatter(xy[:, 0], xy[:, 1], s=36, color="tab:blue", alpha=0.8)
    for (x, y), word in zip(xy, words):
        ax.annotate(word, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=10)
    ax.margins(0.15)  # room for the labels of the outermost points
    ax.grid(True, linestyle="--", linewidth=0.5, alpha=0.6)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize=11)
    return save(fig, path)
