import dataclasses

import numpy as np
import pytest

from napari_instseg.core.evaluate import evaluate
from napari_instseg.core.instances import (
    drop_blobs,
    nms,
    sample_seeds,
    segment,
    split_merged,
)
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.types import Instances, Prediction


@pytest.fixture(scope="module")
def worms():
    s = make_worms((160, 200), n_worms=5, length=(50, 90), n_crossings=1, n_touching=1, seed=3)
    return s, prediction_from_masks(s.masks, embedding_dim=8, seed=1)


def _lookalike(sample, p):
    """Touching pair given one embedding: seeds merge them, the boundary must split them."""
    emb = p.embeddings.copy()
    a, b = sample.metadata["touching"][0]
    only = sample.masks.sum(0) == 1
    ra, ca = np.argwhere(sample.masks[a] & only)[0]
    emb[:, sample.masks[b] & only] = emb[:, ra, ca][:, None]
    return Prediction(emb, p.seediness, p.class_scores, p.boundary, p.foreground)


def test_nms_keeps_higher_score_and_crossings():
    m = np.zeros((4, 10, 10), bool)
    m[0, 2:8, 2:8] = True
    m[1, 2:8, 3:8] = True  # duplicate of 0
    m[2, 4:6, 0:10] = True  # crosses 0, small shared part
    m[3, 3:5, 3:5] = True  # contained in 0
    keep = nms(m, np.array([0.6, 0.9, 0.5, 0.4]), containment_threshold=0.8)
    assert list(keep) == [1, 2]


def test_sample_seeds_one_per_instance_on_oracle(worms):
    s, p = worms
    seeds = sample_seeds(p)
    owners = [set(np.flatnonzero(s.masks[:, r, c])) for r, c in seeds]
    assert all(len(o) == 1 for o in owners)  # never on background or a crossing
    assert {o.pop() for o in owners} == set(range(s.n_instances))
    assert len(seeds) == s.n_instances  # stops once every worm is covered


@pytest.mark.parametrize("method", ["seeds", "hybrid"])
def test_segment_perfect_on_oracle_keeps_overlaps(worms, method):
    s, p = worms
    inst = segment(p, method=method)
    res = evaluate([inst], [s.masks])
    assert res["S"]["0.9"] == 1.0 and res["AP50"] == pytest.approx(1.0)
    a, b = s.metadata["crossings"][0]
    shared = s.masks[a] & s.masks[b]
    assert shared.any() and (inst.masks.sum(0)[shared] == 2).all()
    assert inst.seeds.shape == (len(inst), 2) and len(inst.taus) == len(inst)
    assert (inst.scores > 0.5).all() and (inst.classes == 1).all()


def test_seeds_take_each_seeds_best_tau_class_and_score(worms):
    """Fathi et al.: every instance carries its seed's best (tau, class) and that score.
    Worm 0's scores favour tau 0.9, worm 1's tau 0.25 and class 2, the rest tau 0.5."""
    s, p = worms
    t, _, h, w = p.class_scores.shape
    scores = np.zeros((t, 3, h, w), np.float32)
    scores[:, 1] = p.class_scores[:, 1]
    only = s.masks.sum(0) == 1
    first, second = s.masks[0] & only, s.masks[1] & only
    best = p.class_scores[:, 1].max(axis=0)
    scores[:, 1, first] = 0.9 * best[first]
    scores[3, 1, first] = best[first]  # tau 0.9
    scores[:, 1, second] = 0.0
    scores[:, 2, second] = 0.9 * best[second]
    scores[0, 2, second] = best[second]  # tau 0.25, class 2
    scores[:, 0] = 1.0 - scores[:, 1:].sum(axis=1)
    pred = dataclasses.replace(p, class_scores=scores, seediness=scores[:, 1:].max(axis=(0, 1)))
    inst = segment(pred, method="seeds")
    rows, cols = inst.seeds[:, 0], inst.seeds[:, 1]
    tau, cls, score = pred.best_tau_class()
    np.testing.assert_array_equal(inst.taus, tau[rows, cols])
    np.testing.assert_array_equal(inst.classes, cls[rows, cols])
    np.testing.assert_allclose(inst.scores, score[rows, cols])
    on_first, on_second = first[rows, cols], second[rows, cols]
    assert on_first.any() and on_second.any()
    assert (inst.taus[on_first] == np.float32(0.9)).all()
    assert (inst.taus[on_second] == np.float32(0.25)).all() and (
        inst.classes[on_second] == 2
    ).all()
    assert (inst.taus[~on_first & ~on_second] == np.float32(0.5)).all()


def test_boundary_method_separates_and_cannot_overlap(worms):
    s, p = worms
    inst = segment(p, method="boundary")
    res = evaluate([inst], [s.masks])
    crossing = set(s.metadata["crossings"][0])
    others = [i for i in range(s.n_instances) if i not in crossing]
    from napari_instseg.core.evaluate import iou_matrix

    iou = iou_matrix(inst.masks, s.masks)
    assert (iou.max(0)[others] > 0.9).all()  # worms without a crossing come out right
    assert res["S"]["0.5"] < 1.0  # a crossed worm comes out in pieces


def test_hybrid_beats_seeds_when_embeddings_merge_touching_worms(worms):
    s, p = worms
    bad = _lookalike(s, p)
    acc = {m: evaluate([segment(bad, method=m)], [s.masks])["avS"] for m in ("seeds", "hybrid")}
    assert acc["hybrid"] == 1.0 and acc["seeds"] < 1.0


def test_segment_empty_and_bad_input(worms):
    _, p = worms
    empty = prediction_from_masks(np.zeros((0, 32, 32), bool))
    for method in ("seeds", "boundary", "hybrid"):
        inst = segment(empty, method=method)
        assert len(inst) == 0 and inst.masks.shape == (0, 32, 32)
    with pytest.raises(ValueError, match="unknown method"):
        segment(p, method="magic")
    bad = Prediction(
        p.embeddings,
        np.full(p.shape, np.nan, np.float32),
        p.class_scores,
        p.boundary,
        p.foreground,
    )
    with pytest.raises(ValueError, match="NaN"):
        segment(bad, method="seeds")
    with pytest.raises(ValueError, match="Prediction"):
        segment(np.zeros((5, 5)), method="seeds")


@pytest.mark.parametrize("method", ["seeds", "boundary", "hybrid"])
def test_segment_refuses_nan_or_empty_embeddings(worms, method):
    """Every method says what is wrong with the embeddings: the boundary pipeline reads
    them only to merge fragments, where a NaN mean merged any fragment silently."""
    _, p = worms
    emb = p.embeddings.copy()
    emb[0, 5, 5] = np.nan
    with pytest.raises(ValueError, match="embeddings contain NaN or infinite"):
        segment(dataclasses.replace(p, embeddings=emb), method=method)
    emb[0, 5, 5] = np.inf
    with pytest.raises(ValueError, match="embeddings contain NaN or infinite"):
        segment(dataclasses.replace(p, embeddings=emb), method=method)
    no_dims = dataclasses.replace(p, embeddings=np.zeros((0, *p.shape), np.float32))
    with pytest.raises(ValueError, match=r"empty embeddings of shape \(0, 160, 200\)"):
        segment(no_dims, method=method)
    if method == "boundary":  # finite values whose float32 sum overflows are no NaN
        emb[0, 5, 5] = emb[0, 5, 6] = 3e38
        huge = segment(dataclasses.replace(p, embeddings=emb), method=method)
        assert len(huge) == len(segment(p, method=method))


def test_segment_seeds_refuses_extra_seeds_outside_the_image(worms):
    """A row past the image raised an IndexError, a negative one wrapped round silently."""
    _, p = worms
    h, w = p.shape
    for bad in ([(h, 5)], [(-5, 10)], [(3, w)], [(3, -1)]):
        with pytest.raises(ValueError, match=r"extra_seeds \[\[.*\]\] lie outside the image"):
            segment(p, method="seeds", extra_seeds=bad)
    with pytest.raises(ValueError, match=r"extra_seeds must be \(row, col\) pairs"):
        segment(p, method="seeds", extra_seeds=[(1, 2, 3)])
    plain = segment(p, method="seeds")
    none = segment(p, method="seeds", extra_seeds=np.zeros((0, 2), np.int64))
    np.testing.assert_array_equal(none.masks, plain.masks)


def test_segment_auto_uses_model_recommendation(worms):
    p = dataclasses.replace(worms[1], metadata={})
    p.metadata["recommended_method"] = "boundary"
    p.metadata["segment_params"] = {"boundary": {"min_size": 10**9}}
    # the tuned min_size removes everything; explicit params override the tuned ones
    assert len(segment(p)) == 0
    assert len(segment(p, min_size=30)) == len(segment(p, method="boundary", min_size=30)) > 0
    # a parameter of another method: the chosen method and what it accepts, not a TypeError
    with pytest.raises(ValueError, match=r"'boundary' \(what method='auto' chose.*min_score"):
        segment(p, min_score=0.5)
    with pytest.raises(ValueError, match="accepts boundary_threshold, marker_threshold"):
        segment(p, method="boundary", min_score=0.5)
    p.metadata.pop("recommended_method")
    assert len(segment(p)) == len(segment(p, method="hybrid"))


def _merged(sample, pair):
    """The sample's masks with the pair replaced by their union (a boundary-map gap)."""
    a, b = pair
    keep = [i for i in range(sample.n_instances) if i not in pair]
    masks = np.concatenate([sample.masks[keep], (sample.masks[a] | sample.masks[b])[None]])
    return Instances(masks=masks, scores=np.linspace(0.6, 0.9, len(masks)))


@pytest.mark.parametrize("kind", ["touching", "crossings"])
def test_split_merged_recovers_both_worms(worms, kind):
    s, p = worms
    pair = tuple(s.metadata[kind][0])
    merged = _merged(s, pair)
    # factor 1.2: the long single worm (index 3) is a candidate too and must stay whole;
    # the bridge must span the crossing worm (up to 11 px wide)
    out = split_merged(p, merged, factor=1.2, tau=0.5, bridge_radius=7)
    assert len(out) == len(merged) + 1
    from napari_instseg.core.evaluate import iou_matrix

    iou = iou_matrix(out.masks, s.masks)
    assert (iou.max(0) > 0.9).all()  # every worm, both of the pair included, comes back
    assert out.scores[-2:].tolist() == [merged.scores[-1]] * 2  # parts inherit the score
    for (r, c), m in zip(out.seeds, out.masks, strict=True):
        assert m[r, c]
    if kind == "crossings":  # both parts keep the shared pixels
        shared = s.masks[pair[0]] & s.masks[pair[1]]
        assert (out.masks[-2:].sum(0)[shared] == 2).mean() > 0.5


def test_split_merged_leaves_single_worms_alone(worms):
    s, p = worms
    a, b = s.metadata["touching"][0]
    # one big segment whose pixels all share one embedding: one object, no split
    merged = _merged(s, (a, b))
    emb = p.embeddings.copy()
    emb[:, merged.masks[-1]] = emb[:, merged.masks[-1]].mean(axis=1)[:, None]
    same = dataclasses.replace(p, embeddings=emb)
    out = split_merged(same, merged, factor=1.5, tau=0.5)
    assert len(out) == len(merged) and (out.masks == merged.masks).all()
    # no segment above the factor: nothing changes either
    assert split_merged(p, merged, factor=100.0).masks.shape == merged.masks.shape
    with pytest.raises(ValueError, match="tau"):
        split_merged(p, merged, tau=1.5)
    with pytest.raises(ValueError, match="do not match"):
        split_merged(p, Instances(masks=np.zeros((2, 5, 5), bool)))


def test_boundary_split_factor_separates_worms_merged_by_a_boundary_gap(worms):
    s, p = worms
    a, b = s.metadata["touching"][0]
    gap = dataclasses.replace(p, boundary=np.where(s.masks[a] | s.masks[b], 0.0, p.boundary))
    from napari_instseg.core.evaluate import iou_matrix

    plain = segment(gap, method="boundary")
    split = segment(gap, method="boundary", split_factor=1.5, split_tau=0.5)
    assert iou_matrix(plain.masks, s.masks).max(0)[[a, b]].min() < 0.7  # merged
    assert iou_matrix(split.masks, s.masks).max(0)[[a, b]].min() > 0.8  # split again


def test_merge_fragments_joins_small_pieces_of_one_embedding_only():
    from napari_instseg.core.instances import merge_fragments

    labels = np.zeros((20, 60), np.int64)
    labels[2:6, 0:10], labels[2:6, 10:20], labels[2:6, 20:30] = 1, 2, 3  # one thin worm, cut
    labels[6:16, 0:30] = 4  # a big neighbour touching all three pieces
    labels[6:16, 30:60] = 5  # another big one, same embedding as 4
    emb = np.zeros((2, 20, 60), np.float32)
    emb[0][labels <= 3] = 3.0  # pieces: one embedding; big segments: another (sigma ~ 0)
    out = merge_fragments(labels, emb, min_size=100, tau=0.5)
    assert len(np.unique(out[labels == 1])) == 1
    assert out[3, 5] == out[3, 15] == out[3, 25]  # the pieces are one segment
    assert out[10, 5] != out[3, 5]  # not merged into the different neighbour
    assert out[10, 5] != out[10, 45]  # big segments never merge, however similar
    assert np.array_equal(out == 0, labels == 0)
    # a dissimilar neighbour is not joined even when it is the only one
    alone = np.where(labels == 2, 2, np.where(labels == 4, 4, 0))
    assert np.array_equal(merge_fragments(alone, emb, 100, 0.5), alone)
    # with a threshold above every similarity nothing changes
    emb[0][labels == 2] = 3.5  # sigma(3, 3.5) ~ 0.88
    kept = merge_fragments(labels, emb, 100, 0.95)
    assert out[3, 5] == out[3, 25] and kept[3, 5] != kept[3, 15]


def test_boundary_keeps_a_thin_worm_the_boundary_map_cuts_into_pieces():
    masks = np.zeros((2, 64, 96), bool)
    masks[0, 10:16, 8:88] = True  # thin worm, 480 px
    masks[1, 30:50, 8:88] = True  # wide worm
    p = prediction_from_masks(masks, embedding_dim=4, seed=2)
    boundary = p.boundary.copy()
    boundary[8:18, 24:26] = boundary[8:18, 44:46] = boundary[8:18, 64:66] = 1.0  # cuts
    p = dataclasses.replace(p, boundary=boundary)
    kw = dict(boundary_threshold=0.5, min_size=200, untangle_factor=0.0)
    lost = segment(p, method="boundary", merge_tau=0.0, **kw)
    kept = segment(p, method="boundary", merge_tau=0.3, **kw)

    def best(inst, m):
        return float(((inst.masks & m).sum((1, 2)) / (inst.masks | m).sum((1, 2))).max())

    assert len(lost) == 1 and best(lost, masks[0]) < 0.1  # every piece < min_size: dropped
    assert len(kept) == 2 and best(kept, masks[0]) > 0.8 and best(kept, masks[1]) > 0.8


def test_scores_of_atypically_sized_instances_are_weighted_down():
    from napari_instseg.core.instances import weight_scores_by_size

    masks = np.zeros((5, 40, 120), bool)
    for i in range(3):
        masks[i, 2 + 8 * i : 6 + 8 * i, 10:60] = True  # three typical worms, 200 px
    masks[3, 30:34, 0:100] = True  # two worms left merged: 400 px
    masks[4, 36:40, 0:25] = True  # a piece of a worm: 100 px
    inst = Instances(masks=masks, scores=np.full(5, 0.8, np.float32), classes=np.ones(5))
    out = weight_scores_by_size(inst)
    np.testing.assert_allclose(out.scores, [0.8, 0.8, 0.8, 0.4, 0.4], rtol=1e-6)
    assert out.masks is inst.masks and inst.scores[3] == pytest.approx(0.8)  # a new object
    np.testing.assert_allclose(weight_scores_by_size(inst, power=2.0).scores[3:], 0.2)
    assert weight_scores_by_size(inst, power=0.0) is inst
    one = Instances(masks=masks[3:4], scores=np.array([0.8], np.float32))
    assert weight_scores_by_size(one) is one  # nothing to compare with
    with pytest.raises(ValueError, match="power"):
        weight_scores_by_size(inst, power=-1.0)


def test_boundary_method_ranks_a_merged_pair_below_whole_worms(worms):
    s, p = worms
    a, b = s.metadata["touching"][0]
    gap = dataclasses.replace(p, boundary=np.where(s.masks[a] | s.masks[b], 0.0, p.boundary))
    plain = segment(gap, method="boundary", size_weight=0.0)
    weighted = segment(gap, method="boundary")
    np.testing.assert_array_equal(plain.masks, weighted.masks)  # only the scores change
    areas = plain.masks.reshape(len(plain), -1).sum(1)
    merged = int(np.argmax(areas))
    assert areas[merged] > 1.5 * np.median(areas)
    assert weighted.scores[merged] < plain.scores[merged]
    assert weighted.scores[merged] < np.median(weighted.scores)


def test_areas_and_the_smaller_mask_wins_overlaps():
    long_worm = np.zeros((12, 12), bool)
    long_worm[5:7, :] = True
    short_worm = np.zeros((12, 12), bool)
    short_worm[2:10, 5:7] = True
    inst = Instances(masks=np.stack([long_worm, short_worm]), scores=np.array([0.9, 0.1]))
    np.testing.assert_array_equal(inst.areas, [24, 16])
    labels = inst.to_labels()
    # the crossing goes to the shorter worm although its score is lower
    assert (labels[5:7, 5:7] == 2).all()
    assert (labels[5:7, :5] == 1).all() and (labels[2:5, 5:7] == 2).all()
    assert Instances(masks=np.zeros((0, 4, 4), bool)).areas.shape == (0,)


def _blob_rod_and_arc(shape=(120, 200)):
    """A disc (debris), a straight rod and a curled arc (worms), in one image."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    disc = (rr - 30) ** 2 + (cc - 30) ** 2 <= 14**2
    rod = np.zeros(shape, bool)
    rod[80:88, 20:110] = True
    radius = np.hypot(rr - 50, cc - 155)
    arc = (np.abs(radius - 30) <= 4) & (cc >= 140)  # a "C": compact but not convex
    return np.stack([disc, rod, arc])


def test_drop_blobs_removes_only_the_compact_convex_instance():
    masks = _blob_rod_and_arc()
    instances = Instances(
        masks=masks,
        scores=np.array([0.3, 0.9, 0.8], np.float32),
        seeds=np.array([[30, 30], [84, 60], [50, 185]]),
    )
    kept = drop_blobs(instances)
    assert len(kept) == 2
    np.testing.assert_array_equal(kept.masks, masks[1:])
    np.testing.assert_allclose(kept.scores, [0.9, 0.8])
    np.testing.assert_array_equal(kept.seeds, [[84, 60], [50, 185]])
    # nothing to drop: the same object back
    assert drop_blobs(kept) is kept
    # a disc cut by the image's edge may be a cut-off worm: kept
    at_edge = np.zeros_like(masks[:1])
    at_edge[0, :, :30] = masks[0, :, 16:46]
    assert at_edge[0, :, 0].any()
    assert len(drop_blobs(Instances(masks=at_edge))) == 1
    with pytest.raises(ValueError, match="max_elongation"):
        drop_blobs(instances, max_elongation=0.5)
    with pytest.raises(ValueError, match="min_solidity"):
        drop_blobs(instances, min_solidity=1.5)


def test_segment_blob_filter_from_params_and_from_the_model():
    masks = _blob_rod_and_arc()
    prediction = prediction_from_masks(masks)
    plain = segment(prediction, "seeds")
    assert len(plain) == 3
    filtered = segment(prediction, "seeds", blob_filter=(2.5, 0.8))
    assert len(filtered) == 2
    assert not any((m & masks[0]).any() for m in filtered.masks)
    prediction.metadata["segment_params"] = {"seeds": {"blob_filter": [2.5, 0.8]}}
    assert len(segment(prediction, "seeds")) == 2
    assert len(segment(prediction, "seeds", blob_filter=None)) == 3
    with pytest.raises(ValueError, match="blob_filter"):
        segment(prediction, "seeds", blob_filter=2.5)


def test_hybrid_boundary_first_keeps_every_boundary_segment(worms):
    s, p = worms
    segs = segment(p, method="boundary")
    both = segment(p, method="hybrid", primary="boundary")
    assert len(both) >= len(segs)
    np.testing.assert_array_equal(both.masks[: len(segs)], segs.masks)
    with pytest.raises(ValueError, match="primary"):
        segment(p, method="hybrid", primary="embeddings")


def test_add_uncovered_takes_only_masks_outside_the_segments():
    from napari_instseg.core.instances import _add_uncovered

    masks = np.zeros((4, 40, 60), bool)
    masks[0, 5:10, 5:30] = True  # a segment
    masks[1, 5:10, 5:28] = True  # grown: the same worm again
    masks[2, 25:30, 20:55] = True  # grown: a worm no segment has
    masks[3, 5:10, 20:40] = True  # grown: 40 % of it outside the dilated segment, too little
    segments = Instances(masks=masks[:1], scores=np.array([0.9]), seeds=np.array([[7, 15]]))
    grown = Instances(
        masks=masks[1:],
        scores=np.array([0.8, 0.6, 0.7]),
        seeds=np.array([[7, 10], [27, 30], [7, 35]]),
        taus=np.array([0.5, 0.6, 0.7]),
    )
    out = _add_uncovered(segments, grown, share=0.6, min_size=20, score_factor=0.5)
    assert len(out) == 2
    np.testing.assert_array_equal(out.masks[1], masks[2])
    np.testing.assert_allclose(out.scores, [0.9, 0.3])
    np.testing.assert_array_equal(out.seeds, [[7, 15], [27, 30]])
    assert np.isnan(out.taus[0]) and out.taus[1] == pytest.approx(0.6)
    # a high new-pixel floor adds nothing: the segments come back as they were
    assert _add_uncovered(segments, grown, 0.6, 10**6, 0.5) is segments


def test_instances_take_bool_or_0_1_masks_only():
    assert Instances(np.ones((2, 4, 4), np.uint8)).masks.dtype == bool
    assert Instances(np.zeros((1, 4, 4), np.float32)).areas.tolist() == [0]
    for masks, shown in [
        (np.full((1, 4, 4), 0.3, np.float32), "0.3"),  # probabilities: no longer all True
        (np.full((1, 4, 4), np.nan), "nan"),
        (np.full((1, 4, 4), 2), "2"),  # labels
    ]:
        with pytest.raises(ValueError, match=f"masks must be boolean.*such as {shown}"):
            Instances(masks)
    with pytest.raises(ValueError, match="dtype <U1"):
        Instances(np.array([[["a"]]]))


def test_segment_settings_are_what_segment_runs_with():
    """Every parameter an export records reproduces the segmentation when passed back."""
    from napari_instseg.core.edges import local_contrast
    from napari_instseg.core.instances import segment_settings

    sample = make_worms((160, 200), n_worms=5, length=(50, 90), n_crossings=1, seed=3)
    prediction = prediction_from_masks(sample.masks, embedding_dim=8, seed=1)
    prediction.metadata["recommended_method"] = "boundary"
    prediction.metadata["segment_params"] = {
        "boundary": {"boundary_threshold": 0.6, "min_size": 40, "edge_thresholds": [0.9, 0.95]}
    }
    method, used = segment_settings(prediction, "auto", min_size=30)
    assert method == "boundary"
    assert used["boundary_threshold"] == 0.6  # tuned over the default
    assert used["min_size"] == 30  # given over tuned
    assert used["edge_thresholds"] is None  # no image contrast: the tuned refinement is skipped
    assert "blob_filter" in used and "edge_solidity" in used
    auto = segment(prediction, "auto", min_size=30)
    again = segment(prediction, method, **used)
    assert len(auto) and np.array_equal(auto.masks, again.masks)
    # with the image's contrast the tuned refinement is made, and recorded
    prediction = dataclasses.replace(prediction, contrast=local_contrast(sample.image))
    method, used = segment_settings(prediction, "auto")
    assert used["edge_thresholds"] == [0.9, 0.95]
    assert np.array_equal(segment(prediction).masks, segment(prediction, method, **used).masks)
    with pytest.raises(ValueError, match="does not take fg_thresh"):
        segment_settings(prediction, "auto", fg_thresh=0.5)
