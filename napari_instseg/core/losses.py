"""Losses, as pure functions on tensors, with thin ``nn.Module`` wrappers.

Conventions shared by all losses here:

- ``masks`` is an (N, H, W) bool tensor of one image's instances; instances may overlap.
- Pixels where two worms overlap belong to BOTH instances. For the embedding loss a pair of
  pixels counts as "same" when they share at least one instance, so overlap pixels are
  pulled toward both worms (their embedding settles between the two) and growing either worm
  at a moderate threshold takes them in. For the boundary target the contours of both
  worms are drawn, including the part of one worm's contour that runs across the other.
  For the foreground target they are foreground.
- Similarity is Fathi et al.'s sigma(p, q) = 2 / (1 + exp(||e_p - e_q||^2)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


def pair_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fathi et al.'s similarity between every row of ``a`` and every row of ``b``.

    Parameters
    ----------
    a : torch.Tensor
        (P, D) embeddings.
    b : torch.Tensor
        (Q, D) embeddings.

    Returns
    -------
    torch.Tensor
        (P, Q) values of 2 / (1 + exp(||a_p - b_q||^2)) in (0, 1].
    """
    d2 = squared_distances(a, b)
    return 2.0 * torch.sigmoid(-d2)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, Q) squared Euclidean distances via ||a||^2 + ||b||^2 - 2 a b^T, clamped at 0.

    One fused ``addmm`` (and in-place updates when no gradient is needed): three to four
    times faster than the plain expression for a few hundred rows against a whole crop.
    """
    d2 = torch.addmm((b * b).sum(1)[None, :], a, b.T, alpha=-2.0)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return (d2 + (a * a).sum(1)[:, None]).clamp_min(0.0)
    d2 += (a * a).sum(1)[:, None]
    return d2.clamp_min_(0.0)


def log_similarity_terms(d2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerically stable log(sigma) and log(1 - sigma) from squared distances.

    sigma = 2 / (1 + e^d), so log sigma = log 2 - softplus(d) and
    1 - sigma = (e^d - 1) / (e^d + 1) = tanh(d / 2), so log(1 - sigma) = log tanh(d / 2).
    """
    log_sim = math.log(2.0) - F.softplus(d2)
    log_dissim = torch.log(torch.tanh(d2 / 2.0).clamp_min(_EPS))
    return log_sim, log_dissim


def sample_instance_pixels(
    masks: torch.Tensor,
    n_per_instance: int,
    generator: torch.Generator | None = None,
    include_background: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample pixels uniformly within each instance (and the background).

    Parameters
    ----------
    masks : torch.Tensor
        (N, H, W) bool.
    n_per_instance : int
        K, pixels per instance (with replacement when an instance is smaller).
    generator : torch.Generator, optional
        For reproducibility.
    include_background : bool
        Also sample K pixels of the background (pixels in no instance) as one more group.

    Returns
    -------
    flat_index : torch.Tensor
        (S,) long indices into the flattened H*W image.
    group : torch.Tensor
        (S,) long: the instance each sample was drawn for, N for background.
    """
    n, h, w = masks.shape
    flat = masks.reshape(n, masks.shape[-2] * masks.shape[-1])
    groups = [flat[i] for i in range(n)]
    if include_background:
        if n:
            groups.append(~flat.any(0))
        else:
            groups.append(torch.ones(h * w, dtype=torch.bool, device=masks.device))
    indices, labels = [], []
    for g, member in enumerate(groups):
        where = member.nonzero(as_tuple=True)[0]
        if where.numel() == 0:
            continue
        pick = torch.randint(
            where.numel(), (n_per_instance,), generator=generator, device="cpu"
        ).to(where.device)
        indices.append(where[pick])
        labels.append(torch.full((n_per_instance,), g, dtype=torch.long, device=masks.device))
    if not indices:
        empty = torch.zeros(0, dtype=torch.long, device=masks.device)
        return empty, empty
    return torch.cat(indices), torch.cat(labels)


def embedding_pair_loss(
    embeddings: torch.Tensor,
    masks: torch.Tensor,
    n_per_instance: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fathi et al.'s pairwise similarity loss for one image.

    L_e = -sum_{p,q in S} w_pq [1{same} log sigma(p,q) + 1{different} log(1 - sigma(p,q))]
    over K sampled pixels per instance and K of the background (one more "instance").
    Weights are w_pq proportional to 1 / (|I_p| |I_q|), the sizes of the instances the pair
    was sampled from, normalised to sum to 1 (the 1/|S| of the paper is absorbed by that
    normalisation). The background's size is capped at the largest instance's, so it
    weighs as one more instance rather than vanishing. Two pixels are "same" when they share
    an instance (overlap pixels belong to both worms).

    Parameters
    ----------
    embeddings : torch.Tensor
        (D, H, W).
    masks : torch.Tensor
        (N, H, W) bool instances of the image.
    n_per_instance : int
        K.
    generator : torch.Generator, optional
        For reproducible sampling.

    Returns
    -------
    torch.Tensor
        Scalar loss (0 when there is nothing to compare).
    """
    d, h, w = embeddings.shape
    n = masks.shape[0]
    idx, group = sample_instance_pixels(masks, n_per_instance, generator)
    if idx.numel() < 2:
        return embeddings.sum() * 0.0
    e = embeddings.reshape(d, -1)[:, idx].T  # (S, D)
    flat = masks.reshape(n, masks.shape[-2] * masks.shape[-1])
    membership = torch.cat(
        [flat[:, idx].T, (~flat[:, idx].any(0))[:, None]], dim=1
    ).float()  # (S, N+1), background last
    same = (membership @ membership.T) > 0
    sizes = torch.cat([flat.sum(1).float(), flat.new_zeros(1).float()])
    sizes[n] = (h * w - flat.any(0).sum()).float()
    if n:
        sizes[n] = torch.minimum(sizes[n], sizes[:n].max())
    w_p = 1.0 / sizes[group].clamp_min(1.0)
    weights = w_p[:, None] * w_p[None, :]
    weights = weights / weights.sum()
    log_sim, log_dissim = log_similarity_terms(squared_distances(e, e))
    loss = -(weights * torch.where(same, log_sim, log_dissim)).sum()
    return loss


def grown_mask_targets(
    embeddings: torch.Tensor,
    masks: torch.Tensor,
    taus: tuple[float, ...],
    n_per_instance: int = 10,
    n_background: int = 10,
    iou_threshold: float = 0.5,
    classes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification targets of Fathi et al.: grow masks from sampled pixels, match to GT.

    For K pixels per instance (and ``n_background`` background pixels), the mask
    m(p, tau) = {q : sigma(p, q) >= tau} is grown with the (detached) current embeddings for
    every tau; the target is the class of the ground-truth instance with IoU > 0.5, else 0.

    Parameters
    ----------
    embeddings : torch.Tensor
        (D, H, W); detached inside.
    masks : torch.Tensor
        (N, H, W) bool.
    taus : tuple of float
        Thresholds.
    n_per_instance, n_background : int
        Pixels sampled per instance and from the background.
    iou_threshold : float
        Minimum IoU with a ground-truth instance for a positive target.
    classes : torch.Tensor, optional
        (N,) class of each instance, 1..C (default all 1).
    generator : torch.Generator, optional
        For reproducible sampling.

    Returns
    -------
    flat_index : torch.Tensor
        (S,) sampled pixel indices into H*W.
    targets : torch.Tensor
        (T, S) long class targets.
    """
    d, h, w = embeddings.shape
    n = masks.shape[0]
    idx, _ = sample_instance_pixels(masks, n_per_instance, generator, include_background=False)
    bg = (
        ~masks.reshape(n, masks.shape[-2] * masks.shape[-1]).any(0)
        if n
        else torch.ones(h * w, dtype=torch.bool, device=masks.device)
    )
    bg_where = bg.nonzero(as_tuple=True)[0]
    if n_background and bg_where.numel():
        # drawn on the CPU (the generator's device), then moved: the same pixels on any device
        pick = torch.randint(bg_where.numel(), (n_background,), generator=generator, device="cpu")
        idx = torch.cat([idx, bg_where[pick.to(bg_where.device)]])
    if idx.numel() == 0:
        return idx, torch.zeros((len(taus), 0), dtype=torch.long, device=masks.device)
    if n == 0:
        return idx, torch.zeros((len(taus), idx.numel()), dtype=torch.long, device=masks.device)
    with torch.no_grad():
        flat_e = embeddings.detach().reshape(d, -1).T  # (HW, D)
        flat_m = masks.reshape(n, masks.shape[-2] * masks.shape[-1]).float()  # (N, HW)
        # sigma >= tau  <=>  d2 <= log(2 / tau - 1)
        limits = [math.log(2.0 / tau - 1.0) for tau in taus]
        inter, grown_area = grown_overlaps(flat_e[idx], flat_e, flat_m, limits)
        union = grown_area[:, :, None] + flat_m.sum(1)[None, None, :] - inter
        iou = inter / union.clamp_min(1.0)  # (T, S, N)
        best_iou, best = iou.max(2)
        cls = (
            torch.ones(n, dtype=torch.long, device=masks.device)
            if classes is None
            else classes.to(masks.device).long()
        )
        targets = torch.where(best_iou > iou_threshold, cls[best], torch.zeros_like(best))
    return idx, targets


_GROW_CHUNK = 4096  # pixels per block: the (S, block) distances stay in the CPU's cache
#: pixels per block on a GPU: a 256 x 256 training crop in one block. There the blocks'
#: many small kernels, not their arithmetic, cost the time (a training step is bound by
#: kernel launches, session 32); (T, S, block) float32 stays below a few hundred MB.
_GROW_CHUNK_GPU = 1 << 18


def grown_overlaps(
    seeds: torch.Tensor,
    pixels: torch.Tensor,
    members: torch.Tensor,
    limits: Sequence[float],
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel counts of the masks grown from seed embeddings, and of their overlaps.

    For every seed s and limit t the grown mask is {q : ||e_s - e_q||^2 <= limit_t}. The
    squared distances are made block by block of pixels (one matrix product with the
    norms folded in) and compared straight into float 0/1 blocks, so no (S, H*W) matrix is
    ever held: about 3x faster on the CPU than thresholding the whole distance matrix once
    per limit. Counts are sums of 0/1 in float32, exact below 2**24 pixels.

    Parameters
    ----------
    seeds : torch.Tensor
        (S, D) embeddings of the seeds.
    pixels : torch.Tensor
        (P, D) embeddings of every pixel.
    members : torch.Tensor
        (N, P) float {0, 1}: the pixels of each reference mask.
    limits : sequence of float
        Squared-distance limits, all positive (a limit of tau is log(2 / tau - 1)).
    block : int, optional
        Pixels per block; default 4096 on the CPU, 2**18 on other devices (where all the
        limits are then compared in one kernel).

    Returns
    -------
    inter : torch.Tensor
        (T, S, N) pixels each grown mask shares with each reference mask.
    area : torch.Tensor
        (T, S) pixels in each grown mask.
    """
    n_seeds, n_refs, n_limits = seeds.shape[0], members.shape[0], len(limits)
    if any(not limit > 0 for limit in limits):
        raise ValueError(f"squared-distance limits must be positive, got {list(limits)}")
    # ||a - b||^2 = [a, ||a||^2, 1] . [-2 b, 1, ||b||^2]
    ones_s = seeds.new_ones(n_seeds, 1)
    left = torch.cat([seeds, (seeds * seeds).sum(1, keepdim=True), ones_s], 1)
    ones_p = pixels.new_ones(pixels.shape[0], 1)
    right = torch.cat([-2.0 * pixels, ones_p, (pixels * pixels).sum(1, keepdim=True)], 1)
    refs = torch.cat([members, members.new_ones(1, members.shape[1])], 0)  # + all pixels
    counts = seeds.new_zeros(n_limits * n_seeds, n_refs + 1)
    on_cpu = seeds.device.type == "cpu"
    if block is None:
        block = _GROW_CHUNK if on_cpu else _GROW_CHUNK_GPU
    if not on_cpu:  # the limits as one tensor, for one comparison per block
        limit_t = torch.tensor(list(limits), dtype=seeds.dtype, device=seeds.device)
        limit_t = limit_t[:, None, None]
    for start in range(0, pixels.shape[0], block):
        stop = start + block
        d2 = left @ right[start:stop].T  # (S, block)
        if on_cpu:  # compared straight into float: no bool copy
            grown = d2.new_empty(n_limits, n_seeds, d2.shape[1])
            for t, limit in enumerate(limits):
                torch.le(d2, limit, out=grown[t])
        else:  # every limit in one comparison: fewer kernels
            grown = (d2[None] <= limit_t).to(d2.dtype)
        counts += grown.reshape(n_limits * n_seeds, -1) @ refs[:, start:stop].T
    counts = counts.reshape(n_limits, n_seeds, n_refs + 1)
    return counts[..., :n_refs], counts[..., n_refs]


def classification_loss(
    class_logits: torch.Tensor, flat_index: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Softmax cross-entropy of the per-tau classification head at sampled pixels only.

    Parameters
    ----------
    class_logits : torch.Tensor
        (T, C+1, H, W).
    flat_index : torch.Tensor
        (S,) indices into H*W.
    targets : torch.Tensor
        (T, S) class targets.

    Returns
    -------
    torch.Tensor
        Scalar mean over taus and samples.
    """
    t, c1, h, w = class_logits.shape
    if flat_index.numel() == 0:
        return class_logits.sum() * 0.0
    logits = class_logits.reshape(t, c1, h * w)[:, :, flat_index]  # (T, C+1, S)
    return F.cross_entropy(logits, targets)


def lambda_ramp(epoch: float, start: float, end: float, maximum: float = 0.2) -> float:
    """Weight of the classification loss: 0 before ``start``, linear to ``maximum`` at ``end``."""
    if epoch <= start:
        return 0.0
    if epoch >= end or end <= start:
        return maximum
    return maximum * (epoch - start) / (end - start)


def attraction_loss(embeddings: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Novotny et al.'s attraction to the instance mean: sum_S 1/|S| sum_u ||psi_u - mean_S||.

    Averaged over instances (not summed) so its scale does not depend on the worm count.

    Parameters
    ----------
    embeddings : torch.Tensor
        (D, H, W).
    masks : torch.Tensor
        (N, H, W) bool.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    d = embeddings.shape[0]
    n = masks.shape[0]
    if n == 0:
        return embeddings.sum() * 0.0
    flat_e = embeddings.reshape(d, -1)
    flat_m = masks.reshape(n, masks.shape[-2] * masks.shape[-1]).float()
    area = flat_m.sum(1).clamp_min(1.0)
    means = (flat_m @ flat_e.T) / area[:, None]  # (N, D)
    total = embeddings.new_zeros(())
    for i in range(n):
        member = flat_m[i] > 0
        if member.any():
            diff = flat_e[:, member] - means[i][:, None]
            total = total + diff.pow(2).sum(0).add(_EPS).sqrt().mean()
    return total / n


def square_dilation(masks: torch.Tensor, width: int) -> torch.Tensor:
    """Binary dilation of (..., H, W) bool masks with a (2 width + 1)^2 square.

    Shifted ORs along rows, then columns (the square is separable); nothing comes in from
    outside the image. The same pixels as a max filter, 10-30x faster than ``max_pool2d``
    on float copies of the masks.
    """
    out = masks.clone()
    for step in range(1, width + 1):
        out[..., step:, :] |= masks[..., :-step, :]
        out[..., :-step, :] |= masks[..., step:, :]
    rows = out.clone()
    for step in range(1, width + 1):
        out[..., step:] |= rows[..., :-step]
        out[..., :-step] |= rows[..., step:]
    return out


def square_erosion(masks: torch.Tensor, width: int) -> torch.Tensor:
    """Binary erosion with a (2 width + 1)^2 square; outside the image counts as inside."""
    return ~square_dilation(~masks, width)


def boundary_target(masks: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Instance contours (BAISeg's Y): the inner contour of every instance, drawn in full.

    Where two worms touch, both contours are drawn; where they cross, each worm's contour is
    drawn across the other worm's body.

    Parameters
    ----------
    masks : torch.Tensor
        (N, H, W) bool.
    width : int
        Contour thickness in pixels.

    Returns
    -------
    torch.Tensor
        (H, W) float {0, 1}.
    """
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros((h, w), dtype=torch.float32)
    contour = masks & ~square_erosion(masks, width)
    return contour.any(0).float()


def contact_zone(masks: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Pixels within ``width`` of two or more instances: where worms touch or cross.

    Parameters
    ----------
    masks : torch.Tensor
        (N, H, W) bool.
    width : int
        Reach in pixels (a square neighbourhood).

    Returns
    -------
    torch.Tensor
        (H, W) float {0, 1}.
    """
    n, h, w = masks.shape
    if n < 2:
        return masks.new_zeros((h, w), dtype=torch.float32)
    near = square_dilation(masks, width)
    return (near.sum(0, dtype=torch.int32) >= 2).float()


def balanced_boundary_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    max_alpha: float = 1.0,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BAISeg's class-balanced boundary loss, averaged over pixels.

    L_B = -2 mean[ alpha Y log B + (1 - alpha)(1 - Y) log(1 - B) ], alpha = |Y-| / |Y|
    (the factor 2 makes a half-positive map, alpha = 1/2, equal plain BCE).

    Parameters
    ----------
    logits : torch.Tensor
        (..., H, W) boundary logits.
    target : torch.Tensor
        Same shape, {0, 1}.
    max_alpha : float
        Cap on alpha. 1 is BAISeg's loss. Worms are only ~8 px wide, so with the full
        balance (alpha ~ 0.97) the predicted boundary spreads over the whole worm; a cap
        (e.g. 0.8) keeps it on the contour.
    pixel_weight : torch.Tensor, optional
        Same shape: a further weight per pixel (e.g. more where worms touch,
        :func:`contact_zone`); the class balance is computed without it.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    target = target.float()
    n_pos = target.sum()
    n_all = float(target.numel())
    alpha = ((n_all - n_pos) / max(n_all, 1.0)).clamp(max=max_alpha)
    weight = torch.where(target > 0.5, alpha, 1.0 - alpha)
    if pixel_weight is not None:
        weight = weight * pixel_weight
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return loss / max(n_all, 1.0) * 2.0


def edge_band(target: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Pixels within ``width`` of the foreground's edge, on both sides of it.

    Parameters
    ----------
    target : torch.Tensor
        (..., H, W) foreground {0, 1}.
    width : int
        Half-width of the band in pixels (a square neighbourhood).

    Returns
    -------
    torch.Tensor
        Same shape, {0, 1}: dilation minus erosion of the foreground.
    """
    inside = target > 0.5
    return (square_dilation(inside, width) & ~square_erosion(inside, width)).float()


def foreground_loss(
    logits: torch.Tensor, target: torch.Tensor, edge_weight: float = 0.0, edge_width: int = 1
) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice for the foreground map.

    With ``edge_weight`` > 0 the cross-entropy of the pixels within ``edge_width`` of a
    foreground edge (:func:`edge_band`) counts ``1 + edge_weight`` times (U-Net-style weight
    map, normalised so the weights average 1). Worms are ~8 px wide, so the one-pixel rings
    on either side of a contour are ~40 % of a worm's mask: where they go decides the mask
    IoU at 0.75-0.9.

    Parameters
    ----------
    logits : torch.Tensor
        (..., H, W).
    target : torch.Tensor
        Same shape, {0, 1}.
    edge_weight : float
        Extra weight of the edge band (0: plain BCE).
    edge_width : int
        Half-width of the edge band in pixels.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    target = target.float()
    if edge_weight > 0:
        weight = 1.0 + edge_weight * edge_band(target, edge_width)
        weight = weight / weight.mean()
        bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    else:
        bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + dice


def pixel_contrast_loss(
    features: torch.Tensor,
    boundary: torch.Tensor,
    n_samples: int = 256,
    temperature: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pixel-to-pixel contrast (InfoNCE) between boundary and non-boundary pixels (BAISeg).

    Sampled boundary pixels are pulled together and pushed from sampled interior/background
    pixels, and vice versa, sharpening boundary features.

    Parameters
    ----------
    features : torch.Tensor
        (F, H, W) per-pixel features (L2-normalised inside).
    boundary : torch.Tensor
        (H, W) {0, 1} boundary target.
    n_samples : int
        Pixels sampled from each side.
    temperature : float
        InfoNCE temperature.
    generator : torch.Generator, optional
        For reproducible sampling.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    f = F.normalize(features.reshape(features.shape[0], -1), dim=0)
    flat = boundary.reshape(-1) > 0.5
    pos = flat.nonzero(as_tuple=True)[0]
    neg = (~flat).nonzero(as_tuple=True)[0]
    if pos.numel() < 2 or neg.numel() < 2:
        return features.sum() * 0.0
    ip = pos[
        torch.randint(pos.numel(), (n_samples,), generator=generator, device="cpu").to(pos.device)
    ]
    ineg = neg[
        torch.randint(neg.numel(), (n_samples,), generator=generator, device="cpu").to(neg.device)
    ]
    z = torch.cat([f[:, ip], f[:, ineg]], dim=1).T  # (2S, F)
    label = torch.cat([torch.ones(n_samples, device=z.device), z.new_zeros(n_samples)])
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, -1e9)
    same = (label[:, None] == label[None, :]) & ~eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob * same).sum(1).div(same.sum(1)).mean()


class EmbeddingPairLoss(nn.Module):
    """Module wrapper of :func:`embedding_pair_loss` for a batch."""

    def __init__(self, n_per_instance: int = 10):
        super().__init__()
        self.n_per_instance = n_per_instance

    def forward(self, embeddings: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        """Mean over the batch; ``embeddings`` (B, D, H, W), ``masks`` B tensors (N, H, W)."""
        losses = [
            embedding_pair_loss(e, m, self.n_per_instance)
            for e, m in zip(embeddings, masks, strict=True)
        ]
        return torch.stack(losses).mean()


class BalancedBoundaryLoss(nn.Module):
    """Module wrapper of :func:`balanced_boundary_loss`."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """See :func:`balanced_boundary_loss`."""
        return balanced_boundary_loss(logits, target)


class ForegroundLoss(nn.Module):
    """Module wrapper of :func:`foreground_loss`."""

    def __init__(self, edge_weight: float = 0.0, edge_width: int = 1):
        super().__init__()
        self.edge_weight = edge_weight
        self.edge_width = edge_width

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """See :func:`foreground_loss`."""
        return foreground_loss(logits, target, self.edge_weight, self.edge_width)
