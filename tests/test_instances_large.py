"""The boundary pipeline keeps each instance in its box: a mosaic segments like its tiles.

Every step of ``segment(method="boundary")`` (watershed segments, embedding split,
untangling, blob filter, edge refinement) works on each instance's bounding box plus the
margin it needs (:class:`~napari_instseg.core.types.CroppedInstances`). A 2 x 2 mosaic of
one padded tile has the same medians (area, skeleton length, solidity) as the tile, so
each of its four copies must come out exactly as the tile alone, at its offset: a box or
margin handled wrong shows up as a mask that differs.
"""

import numpy as np
import pytest

from napari_instseg.core.edges import refine_edges
from napari_instseg.core.instances import drop_blobs, segment, split_merged
from napari_instseg.core.types import CroppedInstances, Instances, Prediction
from napari_instseg.core.untangle import untangle


@pytest.fixture(scope="module")
def tile(padded_tile) -> Prediction:
    return padded_tile


def _by_tile(found: Instances, shape: tuple[int, int]) -> list[set[bytes]]:
    """Per tile of the mosaic, its instances' masks (cut to the tile) with score and class."""
    h, w = shape
    tiles: list[set[bytes]] = [set() for _ in range(4)]
    for mask, score, cls in zip(found.masks, found.scores, found.classes, strict=True):
        rows, cols = np.nonzero(mask)
        k = 2 * int(rows[0] >= h) + int(cols[0] >= w)
        r0, c0 = (k // 2) * h, (k % 2) * w
        cut = mask[r0 : r0 + h, c0 : c0 + w]
        assert cut.sum() == mask.sum(), "an instance spans two tiles"
        tiles[k].add(np.packbits(cut).tobytes() + np.float32(score).tobytes() + bytes([cls]))
    return tiles


@pytest.mark.parametrize(
    "params",
    [
        {"edge_thresholds": (0.88, 0.98), "blob_filter": (2.5, 0.8)},
        {"split_factor": 1.5, "split_tau": 0.3, "edge_thresholds": (0.9, 0.97)},
    ],
)
def test_mosaic_segments_like_its_tiles(tile, mosaic, params):
    alone = segment(tile, method="boundary", **params)
    # the untangling cut merged worms apart (else this test would not cover it)
    assert len(alone) > len(segment(tile, method="boundary", untangle_factor=0.0, **params))
    found = segment(mosaic(tile, 2, 2), method="boundary", **params)
    assert len(found) == 4 * len(alone)
    expected = _by_tile(alone, tile.shape)[0]
    assert all(t == expected for t in _by_tile(found, tile.shape))


def test_public_steps_match_the_cropped_pipeline(tile):
    """The public steps on full masks give what the pipeline gives on crops."""
    base = segment(
        tile, method="boundary", untangle_factor=0.0, edge_thresholds=None, blob_filter=None
    )
    untangled = untangle(base, boundary=tile.boundary)
    assert len(untangled) > len(base)
    # weight_scores_by_size (the pipeline's last step) changes scores only
    ref = segment(tile, method="boundary", edge_thresholds=None, blob_filter=None)
    np.testing.assert_array_equal(untangled.masks, ref.masks)
    refined = refine_edges(untangled, tile.contrast, (0.88, 0.98))
    full = segment(tile, method="boundary", edge_thresholds=(0.88, 0.98), blob_filter=None)
    np.testing.assert_array_equal(refined.masks, full.masks)
    assert split_merged(tile, base, factor=1.3).masks.shape[1:] == tile.shape
    assert drop_blobs(untangled, 2.5, 0.8) is untangled  # no blob: the input itself


def test_cropped_instances_round_trip():
    masks = np.zeros((3, 9, 11), bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 0, 10] = True  # a corner pixel
    inst = Instances(masks=masks, scores=np.array([0.5, 0.6, 0.7]), seeds=np.zeros((3, 2)))
    cropped = CroppedInstances.from_instances(inst)
    assert cropped.boxes == [(2, 5, 3, 7), (0, 1, 10, 11), (0, 1, 0, 1)]
    np.testing.assert_array_equal(cropped.to_instances().masks, masks)
    np.testing.assert_array_equal(cropped.areas, inst.areas)
    np.testing.assert_array_equal(cropped.cover(), masks.sum(axis=0))
    box, window = cropped.window(0, 3)
    assert box == (0, 8, 0, 10)
    np.testing.assert_array_equal(window, masks[0, 0:8, 0:10])
    np.testing.assert_array_equal(cropped.region(1, (0, 2, 8, 11)), masks[1, 0:2, 8:11])
    assert cropped.window(2, 1)[1].size == 0


def test_sparse_zeros_makes_only_the_pages_written():
    """Full-image masks of a large image: zeros, writable, no memory for unwritten pages."""
    import psutil

    from napari_instseg.core.types import sparse_zeros

    small = sparse_zeros((3, 4), bool)
    assert small.shape == (3, 4) and not small.any()
    process = psutil.Process()
    before = process.memory_info().rss
    big = sparse_zeros((8, 4096, 2048), bool)  # 64 MB
    assert big.flags.writeable and big.flags.c_contiguous and big.dtype == bool
    big[2, 100:300, 50:80] = True
    # reading every page (a sum, any) must not make them: a shared anonymous map would
    assert int(big.sum()) == 200 * 30 and big[2].any() and not big[3].any()
    assert process.memory_info().rss - before < 16 * 2**20
    np.testing.assert_array_equal(np.flatnonzero(big.any(axis=(0, 2))), np.arange(100, 300))
