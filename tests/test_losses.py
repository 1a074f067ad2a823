"""Loss functions on tiny tensors whose right answer is known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_instseg.core import losses as L


def _squares(h: int = 10, w: int = 10) -> torch.Tensor:
    """Two non-overlapping instances: a 2x2 and a 3x3 square."""
    masks = torch.zeros((2, h, w), dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5:8, 5:8] = True
    return masks


def _constant_embeddings(masks: torch.Tensor, vectors: list[list[float]]) -> torch.Tensor:
    """(D, H, W) embeddings: vectors[i] on instance i, vectors[-1] on the background."""
    d = len(vectors[0])
    emb = torch.empty((d, *masks.shape[1:]))
    emb[:] = torch.tensor(vectors[-1])[:, None, None]
    for i, m in enumerate(masks):
        emb[:, m] = torch.tensor(vectors[i])[:, None]
    return emb


# ---------------------------------------------------------------- similarity


def test_pair_similarity_known_values():
    a = torch.tensor([[0.0, 0.0], [math.sqrt(math.log(3.0)), 0.0], [10.0, 0.0]])
    sim = L.pair_similarity(a[:1], a)
    assert sim.shape == (1, 3)
    assert sim[0, 0].item() == pytest.approx(1.0)
    assert sim[0, 1].item() == pytest.approx(0.5, abs=1e-6)  # d2 = log 3
    assert sim[0, 2].item() < 1e-40 or sim[0, 2].item() == pytest.approx(0.0, abs=1e-12)


def test_squared_distances_matches_cdist():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g)
    expected = torch.cdist(a, b) ** 2
    torch.testing.assert_close(L.squared_distances(a, b), expected, atol=1e-5, rtol=1e-5)
    assert (L.squared_distances(a, a).diagonal() >= 0).all()
    # with gradients (the in-place path is only taken without them): same values, and the
    # gradient of sum ||a_i - b_j||^2 w.r.t. a_i is 2 sum_j (a_i - b_j)
    a_grad = a.clone().requires_grad_(True)
    d2 = L.squared_distances(a_grad, b)
    torch.testing.assert_close(d2.detach(), expected, atol=1e-5, rtol=1e-5)
    d2.sum().backward()
    expected_grad = 2 * (a[:, None, :] - b[None, :, :]).sum(1)
    torch.testing.assert_close(a_grad.grad, expected_grad, atol=1e-4, rtol=1e-4)


def test_log_similarity_terms_match_naive():
    d2 = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    sigma = 2.0 / (1.0 + torch.exp(d2))
    log_sim, log_dissim = L.log_similarity_terms(d2)
    torch.testing.assert_close(log_sim, torch.log(sigma))
    torch.testing.assert_close(log_dissim, torch.log(1.0 - sigma))
    # stable where the naive formula overflows
    big = torch.tensor([1000.0])
    log_sim_big, log_dissim_big = L.log_similarity_terms(big)
    assert torch.isfinite(log_sim_big).all() and log_sim_big.item() < -900
    assert log_dissim_big.item() == pytest.approx(0.0, abs=1e-6)
    # d2 = 0: log(1 - sigma) = log 0 is clamped, finite and very negative
    _, log_dissim_zero = L.log_similarity_terms(torch.tensor([0.0]))
    assert torch.isfinite(log_dissim_zero).all() and log_dissim_zero.item() < -10


# ---------------------------------------------------------------- embedding loss


def test_embedding_pair_loss_hand_computed():
    """Constant embeddings per group: only 'different' pairs count, with 1/(|I_p||I_q|)
    weights normalised to sum 1, whatever pixels were sampled."""
    masks = _squares()
    vectors = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.5]]  # A, B, background
    emb = _constant_embeddings(masks, vectors)
    sizes = [4.0, 9.0, min(100.0 - 13.0, 9.0)]  # background capped at the largest instance
    v = np.asarray(vectors)
    inv = 1.0 / np.asarray(sizes)
    num = 0.0
    for i in range(3):
        for j in range(3):
            if i != j:
                d2 = float(((v[i] - v[j]) ** 2).sum())
                num += inv[i] * inv[j] * math.log(math.tanh(d2 / 2.0))
    expected = -num / inv.sum() ** 2
    for seed, k in [(0, 5), (1, 13)]:
        g = torch.Generator().manual_seed(seed)
        loss = L.embedding_pair_loss(emb, masks, k, generator=g)
        assert loss.item() == pytest.approx(expected, rel=1e-4)
    # not normalised (e.g. 1/|S|^2 only) would differ from the hand value
    assert expected > 0


def test_embedding_pair_loss_separated_vs_collapsed():
    masks = _squares()
    far = _constant_embeddings(masks, [[0.0, 0.0, 0.0], [8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    same = torch.zeros_like(far)
    g = torch.Generator().manual_seed(0)
    low = L.embedding_pair_loss(far, masks, 10, generator=g).item()
    high = L.embedding_pair_loss(same, masks, 10, generator=g).item()
    assert low < 1e-6
    assert high > 5.0  # log(1 - sigma) at d2 = 0 is clamped at log 1e-6 = -13.8


def test_embedding_pair_loss_overlap_counts_as_same_for_both():
    """Two crossing bars; overlap pixels share an instance with both bars."""
    h = w = 12
    masks = torch.zeros((2, h, w), dtype=torch.bool)
    masks[0, 5:7, 1:11] = True  # horizontal
    masks[1, 1:11, 5:7] = True  # vertical
    overlap = masks[0] & masks[1]
    assert overlap.sum() == 4
    g = torch.Generator().manual_seed(3)
    emb = torch.randn((3, h, w), generator=g)
    k = 15
    loss = L.embedding_pair_loss(emb, masks, k, generator=torch.Generator().manual_seed(7))
    # reference: the same samples, pair relation computed naively from the masks
    idx, group = L.sample_instance_pixels(masks, k, torch.Generator().manual_seed(7))
    flat = masks.reshape(2, -1)
    sizes = [float(flat[0].sum()), float(flat[1].sum())]
    sizes.append(min(float((~flat.any(0)).sum()), max(sizes)))
    e = emb.reshape(3, -1)[:, idx].T.double()

    def labels_of(p: int) -> set[int]:
        found = {i for i in range(2) if flat[i, idx[p]]}
        return found or {2}

    def reference(overlap_rule) -> float:
        total, wsum = 0.0, 0.0
        for p in range(len(idx)):
            for q in range(len(idx)):
                wpq = 1.0 / (sizes[group[p]] * sizes[group[q]])
                d2 = float(((e[p] - e[q]) ** 2).sum())
                sim = 2.0 / (1.0 + math.exp(d2))
                same = overlap_rule(p, q)
                term = math.log(sim) if same else math.log(max(1.0 - sim, 1e-6))
                total += wpq * term
                wsum += wpq
        return -total / wsum

    both = reference(lambda p, q: bool(labels_of(p) & labels_of(q)))
    assert loss.item() == pytest.approx(both, rel=1e-4)
    # overlap pixels taken as belonging to only the first bar give a different value
    first_only = reference(lambda p, q: min(labels_of(p)) == min(labels_of(q)))
    assert abs(first_only - both) > 1e-3
    # and identical masks with one embedding for both: every pair is "same"
    twins = torch.stack([masks[0], masks[0]])
    emb2 = _constant_embeddings(twins, [[0.0, 0.0], [0.0, 0.0], [9.0, 0.0]])
    assert L.embedding_pair_loss(emb2, twins, 10).item() < 1e-6


def test_embedding_pair_loss_no_instances_and_gradient():
    emb = torch.randn(4, 8, 8, requires_grad=True)
    empty = torch.zeros((0, 8, 8), dtype=torch.bool)
    loss = L.embedding_pair_loss(emb, empty, 5)
    assert torch.isfinite(loss)
    masks = _squares(8, 8)
    loss = L.embedding_pair_loss(emb, masks, 5)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


# ---------------------------------------------------------------- classification targets


def test_grown_mask_targets_ideal_embeddings():
    masks = _squares(12, 12)
    emb = _constant_embeddings(masks, [[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    taus = (0.25, 0.5, 0.75, 0.9)
    classes = torch.tensor([1, 2])
    idx, targets = L.grown_mask_targets(
        emb, masks, taus, 6, 4, classes=classes, generator=torch.Generator().manual_seed(0)
    )
    assert targets.shape == (4, len(idx)) and len(idx) == 2 * 6 + 4
    flat = masks.reshape(2, -1)
    expected = torch.where(flat[0, idx], 1, torch.where(flat[1, idx], 2, 0))
    assert (expected == 0).sum() == 4
    for t in range(len(taus)):
        assert torch.equal(targets[t], expected)


def test_grown_mask_targets_collapsed_embeddings_are_background():
    masks = _squares(12, 12)
    emb = torch.zeros((2, 12, 12))
    idx, targets = L.grown_mask_targets(emb, masks, (0.5, 0.9), 5, 5)
    assert len(idx) == 15
    assert (targets == 0).all()  # grown mask = whole image, IoU with a worm < 0.5


@pytest.mark.parametrize("block", [None, 1000, 1 << 18])
def test_grown_overlaps_match_thresholding_the_whole_distance_matrix(block):
    # more pixels than one CPU block, so the blocks and their sums are exercised (and one
    # block for all, as on a GPU)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(3 * L._GROW_CHUNK + 123, 4, generator=g)
    seeds = pixels[torch.randint(len(pixels), (9,), generator=g)]
    members = (torch.rand(5, len(pixels), generator=g) < 0.3).float()
    limits = [0.5, 2.0, 6.0]
    inter, area = L.grown_overlaps(seeds, pixels, members, limits, block=block)
    d2 = torch.cdist(seeds.double(), pixels.double()) ** 2
    for t, limit in enumerate(limits):
        grown = (d2 <= limit).double()
        assert torch.equal(area[t].double(), grown.sum(1))
        assert torch.equal(inter[t].double(), grown @ members.double().T)
    assert (area[0] <= area[1]).all() and (area[1] <= area[2]).all()
    with pytest.raises(ValueError, match="positive"):
        L.grown_overlaps(seeds, pixels, members, [0.0])


def test_grown_mask_targets_iou_just_above_and_below_one_half():
    # a 1 x 10 worm; the seed's grown mask covers 6 of its pixels plus k background pixels
    masks = torch.zeros((1, 3, 10), dtype=torch.bool)
    masks[0, 1] = True
    for k, expected in ((1, 1), (2, 0)):  # IoU 6/11 > 0.5, then 6/12 = 0.5 (not above)
        emb = torch.full((1, 3, 10), 10.0)
        emb[0, 1, :6] = 0.0
        emb[0, 0, :k] = 0.0
        idx, targets = L.grown_mask_targets(emb, masks, (0.5,), 10, 0)
        assert (idx // 10 == 1).all()
        seeded_at_zero = emb.reshape(-1)[idx] == 0.0
        assert torch.equal(targets[0], torch.where(seeded_at_zero, expected, 0))


def test_square_dilation_and_erosion_match_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    sparse = rng.random((3, 17, 23)) < 0.15
    dense = rng.random((3, 17, 23)) < 0.85
    square = np.ones((1, 5, 5), bool)
    dilated = L.square_dilation(torch.from_numpy(sparse), 2)
    assert torch.equal(dilated, torch.from_numpy(ndimage.binary_dilation(sparse, square)))
    # outside the image counts as inside: the image's border does not erode
    eroded = L.square_erosion(torch.from_numpy(dense), 2)
    expected = ndimage.binary_erosion(dense, square, border_value=1)
    assert torch.equal(eroded, torch.from_numpy(expected))
    assert eroded.any() and not eroded.all()


def test_classification_loss_at_sampled_pixels_only():
    logits = torch.zeros((2, 2, 4, 4))
    logits[:, 1, 0, 0] = 10.0
    idx = torch.tensor([0])
    good = L.classification_loss(logits, idx, torch.ones((2, 1), dtype=torch.long))
    bad = L.classification_loss(logits, idx, torch.zeros((2, 1), dtype=torch.long))
    assert good.item() < 1e-3 and bad.item() > 9.0
    empty = L.classification_loss(logits, idx[:0], torch.zeros((2, 0), dtype=torch.long))
    assert empty.item() == 0.0


def test_lambda_ramp():
    assert L.lambda_ramp(0, 4, 12) == 0.0
    assert L.lambda_ramp(4, 4, 12) == 0.0
    assert L.lambda_ramp(8, 4, 12) == pytest.approx(0.1)
    assert L.lambda_ramp(6, 4, 12) == pytest.approx(0.05)
    assert L.lambda_ramp(12, 4, 12) == pytest.approx(0.2)
    assert L.lambda_ramp(100, 4, 12) == pytest.approx(0.2)
    assert L.lambda_ramp(5, 4, 4) == pytest.approx(0.2)
    assert L.lambda_ramp(8, 4, 12, maximum=1.0) == pytest.approx(0.5)


# ---------------------------------------------------------------- attraction


def test_attraction_loss():
    masks = _squares()
    const = _constant_embeddings(masks, [[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]])
    assert L.attraction_loss(const, masks).item() == pytest.approx(0.0, abs=1e-2)
    # hand case: instance 0 holds values 0 and 2 (two pixels each) in channel 0 -> mean 1,
    # every distance is 1; instance 1 is constant -> 0; averaged over instances -> 0.5
    emb = const.clone()
    emb[0, 1, 1:3] = 0.0
    emb[0, 2, 1:3] = 2.0
    emb[1, 1:3, 1:3] = 2.0
    assert L.attraction_loss(emb, masks).item() == pytest.approx(0.5, abs=1e-3)
    noisy = const + 0.1 * torch.randn_like(const)
    assert L.attraction_loss(noisy, masks).item() > 0.05
    assert L.attraction_loss(const, masks[:0]).item() == 0.0


# ---------------------------------------------------------------- boundaries


def test_boundary_target_square():
    masks = torch.zeros((1, 10, 10), dtype=torch.bool)
    masks[0, 2:7, 3:8] = True  # 5 x 5
    y = L.boundary_target(masks)
    expected = torch.zeros((10, 10))
    expected[2:7, 3:8] = 1.0
    expected[3:6, 4:7] = 0.0
    assert torch.equal(y, expected)
    assert L.boundary_target(masks[:0]).sum() == 0


def test_boundary_target_crossing_draws_both_contours():
    h = w = 16
    masks = torch.zeros((2, h, w), dtype=torch.bool)
    masks[0, 5:10, 1:15] = True  # horizontal bar
    masks[1, 1:15, 6:11] = True  # vertical bar
    y = L.boundary_target(masks)
    ya, yb = L.boundary_target(masks[:1]), L.boundary_target(masks[1:])
    torch.testing.assert_close(y, torch.maximum(ya, yb))
    crossing = (masks[0] & masks[1]).float()
    # the horizontal bar's top/bottom edges run across the vertical bar and vice versa
    assert ((ya * crossing).sum() > 0) and ((yb * crossing).sum() > 0)
    assert torch.equal(y[5, 6:11], torch.ones(5))  # A's top edge over B
    assert torch.equal(y[5:10, 6], torch.ones(5))  # B's left edge over A
    assert y[7, 8] == 0  # centre of the crossing is inside both
    # a union mask would have no contour inside the crossing
    union = L.boundary_target(masks.any(0, keepdim=True))
    assert (union * crossing).sum() < (y * crossing).sum()


def test_balanced_boundary_loss_hand_value():
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    b = torch.sigmoid(logits)
    alpha = 3.0 / 4.0  # |Y-| / |Y|
    pos = -alpha * torch.log(b[0, 0])
    neg = -(1 - alpha) * (torch.log(1 - b[0, 1]) + torch.log(1 - b[1, 0]) + torch.log(1 - b[1, 1]))
    # mean over the 4 pixels, times 2 (alpha = 1/2 gives plain BCE)
    expected = 2.0 * (pos + neg) / 4.0
    got = L.balanced_boundary_loss(logits, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # balanced: a half-positive map with alpha = 1/2 is plain BCE
    half = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    plain = F.binary_cross_entropy_with_logits(logits, half)
    assert L.balanced_boundary_loss(logits, half).item() == pytest.approx(plain.item(), rel=1e-5)
    assert L.BalancedBoundaryLoss()(logits, target).item() == pytest.approx(got.item())


def test_foreground_loss():
    target = torch.zeros((4, 4))
    target[:2] = 1.0
    zero = L.foreground_loss(torch.zeros((4, 4)), target)
    dice = 1.0 - (2 * 0.5 * 8 + 1) / (0.5 * 16 + 8 + 1)
    assert zero.item() == pytest.approx(math.log(2.0) + dice, rel=1e-5)
    perfect = L.foreground_loss(20.0 * (2 * target - 1), target)
    assert perfect.item() < 1e-3
    assert L.ForegroundLoss()(torch.zeros((4, 4)), target).item() == pytest.approx(zero.item())


def test_edge_band():
    target = torch.zeros((6, 6))
    target[:3] = 1.0
    band = L.edge_band(target)
    assert band[2:4].eq(1).all() and band[:2].eq(0).all() and band[4:].eq(0).all()
    assert L.edge_band(torch.stack([target, target.T])).shape == (2, 6, 6)


def test_foreground_loss_edge_weight():
    target = torch.zeros((6, 6))
    target[:3] = 1.0
    band = L.edge_band(target)
    correct = 20.0 * (2 * target - 1)
    # the same single wrong pixel costs more on the edge than far from it, and the
    # weights average 1 (a uniform error costs the same as unweighted)
    edge_wrong, far_wrong = correct.clone(), correct.clone()
    edge_wrong[2, 0] = -3.0
    far_wrong[0, 0] = -3.0
    w = 3.0
    e = L.foreground_loss(edge_wrong, target, edge_weight=w)
    f = L.foreground_loss(far_wrong, target, edge_weight=w)
    assert e > f
    plain = L.foreground_loss(edge_wrong, target)
    # BCE of the wrong pixel scaled by its normalised weight (1 + w) / mean(weights)
    mean_weight = (1 + w * band).mean().item()
    bce_wrong = torch.nn.functional.softplus(torch.tensor(3.0)).item() / 36
    assert (e - plain).item() == pytest.approx(bce_wrong * ((1 + w) / mean_weight - 1), rel=0.02)
    uniform = torch.zeros((6, 6))
    assert L.foreground_loss(uniform, target, edge_weight=w).item() == pytest.approx(
        L.foreground_loss(uniform, target).item(), rel=1e-5
    )
    assert L.ForegroundLoss(edge_weight=w)(edge_wrong, target).item() == pytest.approx(e.item())


def test_pixel_contrast_loss():
    boundary = torch.zeros((16, 16))
    boundary[4:12, 4] = 1.0
    boundary[4:12, 11] = 1.0
    good = torch.stack([boundary, 1 - boundary, torch.zeros_like(boundary)])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((3, 16, 16), generator=g)
    sharp = L.pixel_contrast_loss(good, boundary, 64, generator=torch.Generator().manual_seed(1))
    g1 = torch.Generator().manual_seed(1)
    blurred = L.pixel_contrast_loss(noise, boundary, 64, generator=g1)
    assert torch.isfinite(sharp) and torch.isfinite(blurred)
    assert sharp.item() < blurred.item()
    assert L.pixel_contrast_loss(noise, torch.zeros((16, 16))).item() == 0.0


def test_embedding_pair_loss_module_batches():
    masks = _squares(8, 8)
    emb = torch.randn(2, 3, 8, 8)
    loss = L.EmbeddingPairLoss(5)(emb, [masks, masks[:1]])
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0


def test_contact_zone_marks_where_two_worms_touch_and_weights_the_boundary_loss_there():
    from napari_instseg.core.losses import balanced_boundary_loss, contact_zone

    masks = torch.zeros(3, 20, 40, dtype=torch.bool)
    masks[0, 2:8, 2:20] = True
    masks[1, 8:14, 2:20] = True  # touches worm 0 along row 7/8
    masks[2, 2:14, 30:38] = True  # far from both
    zone = contact_zone(masks, width=2)
    assert zone[6:10, 2:20].all() and zone[7, 10] == 1  # both sides of the contact
    assert zone[2:14, 28:40].sum() == 0 and zone[0, 10] == 0  # nowhere else
    assert contact_zone(masks[:1]).sum() == 0  # one worm touches nothing
    logits = torch.zeros(20, 40)
    target = (zone > 0).float()
    plain = balanced_boundary_loss(logits, target)
    weighted = balanced_boundary_loss(logits, target, pixel_weight=1.0 + 4.0 * zone)
    assert weighted > plain
    ones = balanced_boundary_loss(logits, target, pixel_weight=torch.ones(20, 40))
    assert torch.isclose(ones, plain)


# ---------------------------------------------------------------- devices
# No GPU here: inside ``with torch.device("meta")`` every tensor made without ``device=``
# lands on the meta device, so a loss that forgets ``device=`` (and would mix CPU and CUDA
# tensors on a GPU) fails or returns meta tensors for CPU inputs.


def test_grown_mask_targets_of_an_empty_crop_stay_on_the_input_device():
    emb = torch.randn(4, 16, 16)
    empty = torch.zeros((0, 16, 16), dtype=torch.bool)
    squares = _squares(16, 16)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        idx, targets = L.grown_mask_targets(emb, empty, (0.5, 0.8), 3, 5, generator=g)
        assert idx.device == empty.device and targets.device == empty.device
        assert idx.shape == (5,) and targets.shape == (2, 5) and not targets.any()
        idx, targets = L.grown_mask_targets(emb, empty, (0.5, 0.8), 3, 0, generator=g)
        assert idx.device == targets.device == empty.device and targets.shape == (2, 0)
        idx, targets = L.grown_mask_targets(emb, squares, (0.5,), 3, 5, generator=g)
        assert idx.device == targets.device == empty.device


def test_sampling_losses_make_every_tensor_on_the_input_device():
    masks = _squares(12, 12)
    emb = torch.randn(3, 12, 12)
    boundary = L.boundary_target(masks)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        for m in (masks, masks[:0]):
            assert L.embedding_pair_loss(emb, m, 4, g).device == emb.device
            assert L.attraction_loss(emb, m).device == emb.device
            idx, group = L.sample_instance_pixels(m, 4, g)
            assert idx.device == group.device == emb.device
        assert L.pixel_contrast_loss(emb, boundary, 8, generator=g).device == emb.device
        assert (
            L.classification_loss(
                torch.randn(2, 2, 12, 12, device="cpu"),
                idx,
                torch.zeros(2, len(idx), dtype=torch.long, device="cpu"),
            ).device
            == emb.device
        )


def test_sampling_with_the_cpu_generator_is_the_same_whatever_the_default_device():
    """Pixels are drawn on the CPU with the CPU generator and then moved, so a run picks the
    same pixels on any device (and a CUDA default device does not break the generator)."""
    masks = _squares(12, 12)
    draws = []
    for where in ("cpu", "meta"):
        g = torch.Generator().manual_seed(3)
        with torch.device(where):
            idx, _ = L.grown_mask_targets(
                torch.zeros(2, 12, 12, device="cpu"), masks[:0], (0.5,), 2, 6, generator=g
            )
            ip = L.sample_instance_pixels(masks, 5, g)[0]
        draws.append(torch.cat([idx, ip]))
    assert torch.equal(draws[0], draws[1])
