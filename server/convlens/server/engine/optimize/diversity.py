"""Lucid's diversity objective: how alike a batch of images is, by the style (Gram matrix) of a layer.

For each image, the Gram matrix G = F F^T of its activations F [C, H*W] at a layer, scaled to unit
Frobenius norm; the similarity of two images is the cosine <G_i, G_j>. `gram_similarity` is the mean over
ordered pairs i != j. Lucid's (and Lucent's) `diversity(layer)` is -sum_{i != j} <G_i, G_j> / n, maximised
beside the unit's objective with a weight (1e2 in their notebooks); a job that sums its images' objectives
instead of averaging them uses the same weight times n: see MaximizeJob.loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalised_grams(acts: torch.Tensor) -> torch.Tensor:
    """[N, C, C] Gram matrices of [N, C, H, W] activations, each of unit Frobenius norm."""
    flat = acts.flatten(2)
    grams = flat @ flat.transpose(1, 2)
    return F.normalize(grams.flatten(1), p=2, dim=1).view_as(grams)


def gram_similarity(acts: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of the Gram matrices over ordered pairs of distinct images (a scalar; 0 for
    fewer than two images). Differentiable."""
    n = acts.shape[0]
    if n < 2:
        return acts.new_zeros(())
    grams = normalised_grams(acts).flatten(1)
    cos = grams @ grams.T  # [N, N], ones on the diagonal
    return (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
