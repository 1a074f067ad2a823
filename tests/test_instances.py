import dataclasses

import numpy as np
import pytest

from napari_instseg.core.evaluate import evaluate
from napari_instseg.core.instances import nms, sample_seeds, segment
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.types import Prediction


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


def test_segment_auto_uses_model_recommendation(worms):
    p = dataclasses.replace(worms[1], metadata={})
    p.metadata["recommended_method"] = "boundary"
    p.metadata["segment_params"] = {"boundary": {"min_size": 10**9}}
    # the tuned min_size removes everything; explicit params override the tuned ones
    assert len(segment(p)) == 0
    assert len(segment(p, min_size=30)) == len(segment(p, method="boundary", min_size=30)) > 0
    p.metadata.pop("recommended_method")
    assert len(segment(p)) == len(segment(p, method="hybrid"))
