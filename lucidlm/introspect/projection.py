"""Two-dimensional maps of a few vectors: PCA, and a small exact t-SNE.

Both take X (N, C) float and return coordinates (N, 2). They are written for tens of
points (words on a map), not thousands: t-SNE here is the exact O(N²) algorithm.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError


def _check_points(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[0] < 2:
        raise InvalidArgumentError(f"a 2-D map needs at least 2 points, got {x.shape[0] if x.dim() == 2 else 0}")
    return x.double()


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project onto the two directions of largest variance -> (coords (N, 2), explained variance ratio (2,)).

    Exact SVD of the centred points. Each axis's sign is chosen so the first point has a
    coordinate >= 0 (SVD leaves it arbitrary), so the same input always gives the same picture.
    """
    x = _check_points(x)
    centred = x - x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (min(N, C), C)
    axes = torch.zeros(2, x.shape[1], dtype=x.dtype)
    axes[: vh.shape[0]] = vh[:2]  # 2 points span only one direction: the second axis stays 0
    coords = centred @ axes.T  # (N, 2)
    coords = coords * torch.where(coords[0] < 0, -1.0, 1.0)
    variance = singular.pow(2)
    ratio = torch.zeros(2, dtype=x.dtype)
    ratio[: len(variance[:2])] = variance[:2] / variance.sum().clamp(min=1e-300)
    return coords.float(), ratio.float()


def _affinities(x: torch.Tensor, perplexity: float) -> torch.Tensor:
    """Symmetric P (N, N): row i is a Gaussian around point i whose width gives the wanted
    perplexity (found by bisection on the precision beta), then P = (P_i|j + P_j|i) / 2N."""
    n = x.shape[0]
    d2 = torch.cdist(x, x).pow(2)  # (N, N)
    d2 = d2 / d2[d2 > 0].mean().clamp(min=1e-300)  # scale-free, so one bracket for beta fits all inputs
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    target = math.log(perplexity)
    lo, hi = torch.full((n,), -20.0, dtype=x.dtype), torch.full((n,), 20.0, dtype=x.dtype)  # log beta
    for _ in range(64):
        log_beta = (lo + hi) / 2
        logits = (-d2 * log_beta.exp()[:, None]).masked_fill(~off_diagonal, -math.inf)
        p = logits.softmax(dim=1)
        entropy = -(p * p.clamp(min=1e-300).log()).sum(dim=1)
        too_flat = entropy > target  # too wide: raise beta
        lo = torch.where(too_flat, log_beta, lo)
        hi = torch.where(too_flat, hi, log_beta)
    return (p + p.T) / (2 * n)


def tsne_2d(x: torch.Tensor, perplexity: float | None = None, steps: int = 1000, seed: int = 0) -> torch.Tensor:
    """Exact t-SNE (van der Maaten & Hinton 2008, JMLR 9:2579) -> coords (N, 2).

    Gradient descent on KL(P || Q) with Student-t similarities Q in the map, 250 steps of
    early exaggeration (P x 12), momentum 0.5 then 0.8 and per-coordinate adaptive gains,
    as in the paper. Perplexity defaults to (N - 1) / 3 capped to [1, 30]. The start is the
    PCA map shrunk to a tiny spread, so a run is deterministic (`seed` only breaks ties).
    """
    x = _check_points(x)
    n = x.shape[0]
    perplexity = perplexity if perplexity is not None else min(max((n - 1) / 3, 1.0), 30.0)
    if not 1 <= perplexity < n:
        raise InvalidArgumentError(f"t-SNE perplexity must be in [1, {n}) for {n} points, got {perplexity}")
    p = _affinities(x, perplexity)
    generator = torch.Generator().manual_seed(seed)
    y = pca_2d(x)[0].double()
    y = 1e-4 * (y / y.std().clamp(min=1e-12) + 1e-3 * torch.randn(n, 2, generator=generator, dtype=torch.float64))
    velocity, gains = torch.zeros_like(y), torch.ones_like(y)
    learning_rate = max(n / 12 / 4, 50.0)
    for step in range(steps):
        exaggeration, momentum = (12.0, 0.5) if step < 250 else (1.0, 0.8)
        diff = y[:, None, :] - y[None, :, :]  # (N, N, 2)
        kernel = 1 / (1 + diff.pow(2).sum(-1))  # (N, N) Student-t with one degree of freedom
        kernel.fill_diagonal_(0)
        q = kernel / kernel.sum()
        grad = 4 * (((exaggeration * p - q) * kernel)[:, :, None] * diff).sum(dim=1)  # (N, 2)
        gains = torch.where(torch.sign(grad) != torch.sign(velocity), gains + 0.2, gains * 0.8).clamp(min=0.01)
        velocity = momentum * velocity - learning_rate * gains * grad
        y = y + velocity
        y = y - y.mean(dim=0)
    return y.float()
