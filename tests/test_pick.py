"""Clicks that start from the automatic segments (core/pick.py)."""

import numpy as np
import pytest

from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.pick import (
    add_to_mask,
    automatic_segments,
    cut_away,
    grow_from_segments,
)
from napari_instseg.core.types import Instances

SHAPE = (40, 60)


def _worms():
    left = np.zeros(SHAPE, bool)
    right = np.zeros(SHAPE, bool)
    left[16:24, 4:30] = True  # two worms end to end ...
    right[16:24, 30:56] = True  # ... touching at column 30
    return left, right


def _merged(left, right, seeds=None):
    """The automatic segmentation got the pair as one segment (a merge)."""
    return Instances(
        masks=(left | right)[None],
        scores=np.ones(1, np.float32),
        classes=np.ones(1, np.int64),
        seeds=None if seeds is None else np.asarray(seeds, np.int64),
    )


@pytest.fixture(scope="module")
def pair():
    left, right = _worms()
    prediction = prediction_from_masks(np.stack([left, right]), embedding_dim=8, seed=0)
    return left, right, prediction


def test_first_click_picks_the_segment_under_it(pair):
    left, right, prediction = pair
    segments = Instances(masks=np.stack([left, right]), scores=np.ones(2, np.float32))
    mask = grow_from_segments(prediction, (20, 40), instances=segments)
    assert np.array_equal(mask, right)
    # where two segments overlap the smaller is taken
    long = left | right
    segments = Instances(masks=np.stack([long, right]), scores=np.ones(2, np.float32))
    assert np.array_equal(grow_from_segments(prediction, (20, 40), instances=segments), right)


def test_negative_click_cuts_a_merged_pair_along_the_boundary(pair):
    left, right, prediction = pair
    merged = _merged(left, right)
    assert np.array_equal(grow_from_segments(prediction, (20, 10), instances=merged), left | right)
    mask = grow_from_segments(prediction, (20, 10), negative=(20, 50), instances=merged)
    # the cut follows the boundary map's ridge between the two worms (a pixel of slack)
    assert (mask & left).sum() >= left.sum() - 8
    assert (mask & right).sum() <= 8
    # a negative click outside the mask changes nothing
    outside = grow_from_segments(prediction, (20, 10), negative=(2, 2), instances=merged)
    assert np.array_equal(outside, left | right)


def test_later_click_takes_only_its_part_of_another_segment(pair):
    left, right, prediction = pair
    # the segmentation gave the left worm's tail (columns 4-11) to a wrong, third segment
    tail = np.zeros(SHAPE, bool)
    tail[16:24, 4:12] = True
    body = left & ~tail
    wrong = tail | right  # not connected; its own seed lies in the right worm
    segments = Instances(
        masks=np.stack([body, wrong]),
        scores=np.ones(2, np.float32),
        seeds=np.array([[20, 20], [20, 45]]),
    )
    first = grow_from_segments(prediction, (20, 20), instances=segments)
    assert np.array_equal(first, body)
    both = grow_from_segments(prediction, [(20, 20), (20, 6)], instances=segments)
    assert np.array_equal(both, left)  # the tail, not the right worm
    # the same click on a worm from Segment all (a mask without clicks)
    assert np.array_equal(add_to_mask(prediction, body, (20, 6), instances=segments), left)
    assert np.array_equal(add_to_mask(prediction, body, (20, 20), instances=segments), body)
    with pytest.raises(ValueError, match="shape"):
        add_to_mask(prediction, body[:5], (20, 6), instances=segments)


def test_later_click_on_no_segment_takes_nearby_foreground(pair):
    left, right, prediction = pair
    segments = Instances(masks=left[None], scores=np.ones(1, np.float32))
    mask = grow_from_segments(prediction, [(20, 10), (20, 34)], instances=segments, reach=6)
    added = mask & ~left
    assert added.any() and added[20, 34]
    assert not (added & ~right).any()  # foreground only
    rows, cols = np.nonzero(added)
    assert np.hypot(rows - 20, cols - 34).max() <= 6
    # a click on background adds nothing
    assert np.array_equal(
        grow_from_segments(prediction, [(20, 10), (3, 3)], instances=segments), left
    )


def test_first_click_on_no_segment_grows_from_the_embeddings(pair):
    left, right, prediction = pair
    segments = Instances(masks=left[None], scores=np.ones(1, np.float32))
    mask = grow_from_segments(prediction, (20, 45), instances=segments, edge_thresholds=None)
    assert (mask & right).sum() / (mask | right).sum() > 0.9


def test_automatic_segments_cached_per_prediction(pair):
    *_, prediction = pair
    first = automatic_segments(prediction)
    assert automatic_segments(prediction) is first
    assert len(first) == 2
    metadata = dict(prediction.metadata)
    try:  # other tuned parameters: segmented again, not the stale segments
        prediction.metadata["segment_params"] = {"boundary": {"min_size": 10**6}}
        prediction.metadata["recommended_method"] = "boundary"
        assert len(automatic_segments(prediction)) == 0
    finally:
        prediction.metadata.clear()
        prediction.metadata.update(metadata)
    assert automatic_segments(prediction) is first


def test_bad_input(pair):
    left, right, prediction = pair
    segments = Instances(masks=left[None], scores=np.ones(1, np.float32))
    with pytest.raises(ValueError, match="positive seed"):
        grow_from_segments(prediction, [], instances=segments)
    with pytest.raises(ValueError, match="outside"):
        grow_from_segments(prediction, (100, 5), instances=segments)
    with pytest.raises(ValueError, match="tau"):
        grow_from_segments(prediction, (20, 10), tau=1.5, instances=segments)
    other = Instances(masks=np.zeros((1, 10, 10), bool), scores=np.ones(1, np.float32))
    with pytest.raises(ValueError, match="shape"):
        grow_from_segments(prediction, (20, 10), instances=other)


def test_clicks_start_from_segments_only_for_tuned_models_and_images_that_fit(pair, monkeypatch):
    from napari_instseg.core import pick

    *_, prediction = pair
    metadata = dict(prediction.metadata)
    try:
        prediction.metadata.pop("segment_params", None)
        assert not pick.starts_from_segments(prediction)  # nothing tuned
        prediction.metadata["segment_params"] = {"boundary": {}}
        assert pick.starts_from_segments(prediction)
        monkeypatch.setattr(pick, "MAX_SEGMENT_PIXELS", SHAPE[0] * SHAPE[1] - 1)
        assert not pick.starts_from_segments(prediction)  # a mosaic: embedding growth
    finally:
        prediction.metadata.clear()
        prediction.metadata.update(metadata)


def test_cut_away_splits_a_merged_segment_keeping_the_far_side(pair):
    left, right, prediction = pair
    merged = left | right
    kept = cut_away(prediction, merged, (20, 50))  # a negative click on the right worm
    assert (kept & left).sum() >= left.sum() - 8 and (kept & right).sum() <= 8
    kept = cut_away(prediction, merged, (20, 8))  # on the left one
    assert (kept & right).sum() >= right.sum() - 8 and (kept & left).sum() <= 8
    assert np.array_equal(cut_away(prediction, merged, (2, 2)), merged)  # outside: no cut
    with pytest.raises(ValueError, match="shape"):
        cut_away(prediction, merged[:10], (20, 8))


def test_cut_away_keeps_the_side_of_given_seeds(pair):
    left, right, prediction = pair
    merged = left | right
    # the worm's own click (e.g. a split part's seed) decides the kept side
    kept = cut_away(prediction, merged, (20, 28), keep=(20, 50))
    assert (kept & right).sum() >= right.sum() - 8 and (kept & left).sum() <= 8
