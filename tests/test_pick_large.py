"""Clicks on large images start from the automatic segments, read in their boxes.

The segments the clicks start from are kept as crops
(:func:`~napari_instseg.core.pick.segments_cropped`), so that a click on a mosaic of
hundreds of worms reads a few boxes, not (N, H, W) masks. A click there must give what the
same click gives on the (N, H, W) masks, and a click on a mosaic above the old 4 M pixel
limit the mask the same click gives on the tile alone, at its offset.
"""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from napari_instseg.core import pick
from napari_instseg.core.instances import segment, segment_cropped
from napari_instseg.core.pick import (
    add_to_mask,
    automatic_segments,
    cut_away,
    grow_from_segments,
    segment_all,
    segments_cropped,
    starts_from_segments,
)
from napari_instseg.core.types import CroppedInstances, Prediction

TUNED = {
    "recommended_method": "boundary",
    "segment_params": {"boundary": {"edge_thresholds": (0.88, 0.98)}},
}


@pytest.fixture(scope="module")
def tile(padded_tile) -> Prediction:
    return dataclasses.replace(padded_tile, metadata=dict(TUNED))


def _clicks(p: Prediction, segments: CroppedInstances) -> list[tuple[int, int]]:
    """A pixel inside every segment, and foreground pixels on none."""
    points = []
    for k in range(len(segments)):
        r0, _, c0, _ = segments.boxes[k]
        rows, cols = np.nonzero(segments.crops[k])
        j = len(rows) // 2
        points.append((int(rows[j]) + r0, int(cols[j]) + c0))
    free = np.argwhere((np.asarray(p.foreground) > 0.1) & (segments.cover() == 0))
    points += [tuple(int(v) for v in free[k]) for k in range(0, len(free), max(len(free) // 6, 1))]
    return points


def _old_nearer_part(boundary, region, keep, other, radius=0):
    """The whole-image version ``core.pick._nearer_part`` had before it worked in a window."""
    pts = np.concatenate([keep, other]) if len(other) else keep
    image = np.zeros(region.shape, bool)
    image[pts[:, 0], pts[:, 1]] = True
    rows, cols = np.nonzero(region | image)
    h, w = region.shape
    box = (
        slice(max(int(rows.min()) - radius - 1, 0), min(int(rows.max()) + radius + 2, h)),
        slice(max(int(cols.min()) - radius - 1, 0), min(int(cols.max()) + radius + 2, w)),
    )
    markers = np.zeros(region.shape, np.int32)
    markers[keep[:, 0], keep[:, 1]] = 1
    if radius:
        markers = ndimage.maximum_filter(markers, size=2 * radius + 1) * region
    others = np.zeros(region.shape, bool)
    others[other[:, 0], other[:, 1]] = True
    if radius:
        others = ndimage.maximum_filter(others, size=2 * radius + 1) & region
    markers[others] = 2
    markers[keep[:, 0], keep[:, 1]] = 1
    sub = region[box] | (markers[box] > 0)
    flooded = watershed(boundary[box], markers[box], mask=sub)
    out = np.zeros(region.shape, bool)
    out[box] = flooded == 1
    return out


@pytest.mark.parametrize("radius", [0, 2])
def test_nearer_part_in_a_window_is_the_whole_image_result(radius):
    rng = np.random.default_rng(radius)
    shape = (50, 70)
    boundary = rng.random(shape).astype(np.float32)
    for trial in range(40):
        region = np.zeros(shape, bool)
        r, c = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        if trial % 4 == 0:  # at the image's edges and corners
            r, c = [0, shape[0] - 9][trial % 8 // 4], [0, shape[1] - 9][trial % 3 % 2]
        region[r : r + rng.integers(3, 9), c : c + rng.integers(3, 30)] = True
        region &= rng.random(shape) > 0.1
        inside = np.argwhere(region)
        keep = inside[rng.integers(0, len(inside), 1 + trial % 2)]
        other = inside[rng.integers(0, len(inside), trial % 3)]
        if trial % 5 == 0:  # a pixel off the region (a click outside it)
            other = np.concatenate([other, [[int(rng.integers(0, 50)), int(rng.integers(0, 70))]]])
        expected = _old_nearer_part(boundary, region, keep, other, radius)
        found = pick._nearer_part(boundary, region, keep, other, radius)
        np.testing.assert_array_equal(found, expected, err_msg=f"trial {trial}")


def test_crops_and_full_masks_give_the_same_clicks(tile):
    full = segment(tile)
    crops = segment_cropped(tile)
    np.testing.assert_array_equal(crops.to_instances().masks, full.masks)
    np.testing.assert_array_equal(crops.to_instances().scores, full.scores)
    assert segments_cropped(tile) is segments_cropped(tile)
    np.testing.assert_array_equal(automatic_segments(tile).masks, full.masks)
    assert segment_all(tile) is segments_cropped(tile)  # Segment all reuses it
    assert segment_all(tile, edge_thresholds=None) is segments_cropped(tile, refine_edges=False)
    other = segment_all(tile, method="boundary", untangle_factor=0.0)
    assert isinstance(other, CroppedInstances) and other is not segments_cropped(tile)
    points = _clicks(tile, crops)
    assert len(points) > len(crops)
    for i, p in enumerate(points):
        q = points[(i + 1) % len(points)]
        near = (min(p[0] + 9, tile.shape[0] - 1), p[1])
        for seeds, negative in (([p], None), ([p, near], None), ([p, q], [near])):
            expected = grow_from_segments(tile, seeds, negative, instances=full)
            np.testing.assert_array_equal(
                grow_from_segments(tile, seeds, negative, instances=crops), expected
            )
            np.testing.assert_array_equal(grow_from_segments(tile, seeds, negative), expected)
    for k in range(len(full)):
        mask = full.masks[k]
        rows, cols = np.nonzero(mask)
        inside = (int(rows[len(rows) // 3]), int(cols[len(rows) // 3]))
        for q in points[:6]:
            np.testing.assert_array_equal(
                add_to_mask(tile, mask, q), add_to_mask(tile, mask, q, instances=full)
            )
        assert cut_away(tile, mask, inside).sum() <= mask.sum()


@pytest.mark.slow
def test_a_click_on_a_large_mosaic_picks_what_it_picks_on_the_tile(tile, mosaic):
    h, w = tile.shape  # 172 x 212
    big = mosaic(tile, 12, 10)  # 2064 x 2120: more than the old limit of 4 M pixels
    assert big.shape[0] * big.shape[1] > 4_000_000
    assert starts_from_segments(big) and starts_from_segments(tile)
    alone = segments_cropped(tile)
    assert len(segments_cropped(big)) == 120 * len(alone)
    points = _clicks(tile, alone)
    for k, (i, j) in enumerate([(0, 0), (5, 7), (11, 9), (11, 0)]):
        dr, dc = i * h, j * w
        for n, p in enumerate(points):
            q = points[(n + 1 + k) % len(points)]
            near = (min(p[0] + 9, h - 1), p[1])
            for seeds, negative in (([p], None), ([p, near], None), ([p, q], [near])):
                expected = grow_from_segments(tile, seeds, negative)
                moved = [(r + dr, c + dc) for r, c in seeds]
                neg = None if negative is None else [(r + dr, c + dc) for r, c in negative]
                found = grow_from_segments(big, moved, neg)
                cut = found[dr : dr + h, dc : dc + w]
                assert cut.sum() == found.sum(), "a click's mask left its tile"
                np.testing.assert_array_equal(cut, expected)
