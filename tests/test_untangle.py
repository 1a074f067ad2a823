"""Untangling merged worms by the shape of their skeleton (core/untangle.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import line

from napari_instseg.core.types import Instances
from napari_instseg.core.untangle import (
    _cropped_skeleton,
    _path_order,
    cut_at_kink,
    cut_end_to_end,
    join_cut_arms,
    untangle,
    untangle_clump,
    untangle_segment,
)


def _bar(shape, start, end, radius=4):
    """A worm-like straight bar: a line dilated by a disk of ``radius``."""
    out = np.zeros(shape, bool)
    rr, cc = line(*start, *end)
    out[rr, cc] = True
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(out, xx**2 + yy**2 <= radius**2)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def _best_ious(parts, truths):
    return sorted(max(_iou(p, t) for p in parts) for t in truths)


SHAPE = (160, 160)


def test_a_crossing_is_cut_into_two_whole_worms_that_share_the_crossing():
    a = _bar(SHAPE, (20, 20), (140, 140))
    b = _bar(SHAPE, (20, 135), (140, 25))
    parts = untangle_segment(a | b)
    assert parts is not None and len(parts) == 2
    assert _best_ious(parts, [a, b])[0] > 0.93
    assert (parts[0] & parts[1] & a & b).sum() >= 0.8 * (a & b).sum()  # both keep it


def test_a_worm_touching_another_ones_side_is_cut_off():
    a = _bar(SHAPE, (80, 10), (80, 150))  # horizontal
    b = _bar(SHAPE, (10, 60), (75, 75))  # ends on a's upper side
    parts = untangle_segment(a | b)
    assert parts is not None and len(parts) == 2
    assert _best_ious(parts, [a, b])[0] > 0.93


def test_worms_touching_end_to_end_are_cut_at_the_waist():
    a = _bar(SHAPE, (80, 5), (80, 76), radius=4)
    b = _bar(SHAPE, (80, 84), (80, 155), radius=4)
    waist = _bar(SHAPE, (80, 76), (80, 84), radius=2)
    merged = a | b | waist
    assert untangle_segment(merged) is None  # no junction
    assert cut_end_to_end(merged, typical_length=70) is not None
    parts = cut_end_to_end(merged, typical_length=70)
    assert _best_ious(parts, [a, b])[0] > 0.85
    assert cut_end_to_end(merged, typical_length=110) is None  # not long enough


def test_a_boundary_peak_cuts_worms_touching_end_to_end_without_a_waist():
    a = _bar(SHAPE, (80, 5), (80, 79))
    b = _bar(SHAPE, (80, 81), (80, 155))
    merged = a | b  # the same width all along: no waist
    assert cut_end_to_end(merged, typical_length=70) is None
    boundary = np.full(SHAPE, 0.5, np.float32)
    boundary[:, 78:83] = 0.95  # where the two worms meet
    parts = cut_end_to_end(merged, typical_length=70, boundary=boundary)
    assert parts is not None and _best_ious(parts, [a, b])[0] > 0.9
    boundary[:, 78:83] = 0.6  # too weak a peak
    assert cut_end_to_end(merged, typical_length=70, boundary=boundary) is None


def test_single_worms_and_sharp_bends_stay_whole():
    worm = _bar(SHAPE, (20, 20), (140, 140))
    assert untangle_segment(worm) is None
    # two arms at a right angle are no straight-through pair: a bend, not two worms
    elbow = _bar(SHAPE, (20, 40), (100, 40)) | _bar(SHAPE, (100, 40), (100, 140))
    assert untangle_segment(elbow) is None


def test_untangle_replaces_only_large_merged_segments():
    singles = [_bar(SHAPE, (10, 10 + 12 * i), (60, 10 + 12 * i)) for i in range(4)]
    crossing = _bar(SHAPE, (70, 20), (150, 100)) | _bar(SHAPE, (70, 100), (150, 20))
    masks = np.stack([*singles, crossing])
    inst = Instances(
        masks=masks,
        scores=np.linspace(0.5, 0.9, 5).astype(np.float32),
        classes=np.ones(5, np.int64),
        seeds=np.array([[35, 10 + 12 * i] for i in range(4)] + [[110, 60]]),
        taus=np.full(5, 0.5, np.float32),
    )
    out = untangle(inst)
    assert len(out) == 6
    assert np.array_equal(out.masks[:4], masks[:4])
    assert np.allclose(out.scores[4:], 0.9) and np.allclose(out.taus, 0.5)
    for part, seed in zip(out.masks[4:], out.seeds[4:], strict=True):
        assert part[seed[0], seed[1]]  # every part holds its seed
    # the segment's seed lies in the crossing, which both parts keep: only one reuses it
    assert tuple(out.seeds[4]) != tuple(out.seeds[5])
    assert untangle(inst, factor=0) is inst
    assert untangle(inst, factor=10.0) is inst  # nothing large enough


def test_untangle_segment_rejects_bad_input():
    with pytest.raises(ValueError, match="2D"):
        untangle_segment(np.zeros((2, 3, 4), bool))
    assert untangle_segment(np.zeros((10, 10), bool)) is None


CLUMP_SHAPE = (200, 200)


def _clump_of_three():
    """One long worm crossed by two others at two places (two crossings)."""
    return [
        _bar(CLUMP_SHAPE, (100, 10), (100, 190)),
        _bar(CLUMP_SHAPE, (20, 50), (180, 60)),
        _bar(CLUMP_SHAPE, (20, 150), (180, 130)),
    ]


def test_a_clump_with_two_crossings_is_cut_into_its_three_worms():
    worms = _clump_of_three()
    clump = np.any(worms, axis=0)
    assert untangle_segment(clump) is None  # more than one crossing: not a simple case
    parts = untangle_clump(clump)
    assert parts is not None and len(parts) == 3
    assert _best_ious(parts, worms)[0] > 0.95


def test_a_worm_ending_on_a_clump_and_four_worms_in_a_grid_are_traced():
    long_worm = _bar(CLUMP_SHAPE, (100, 10), (100, 190))
    ends_on_it = _bar(CLUMP_SHAPE, (20, 50), (95, 55))  # a T: its tip on the long worm's side
    crosses = _bar(CLUMP_SHAPE, (20, 150), (180, 130))
    parts = untangle_clump(long_worm | ends_on_it | crosses)
    assert parts is not None and len(parts) == 3
    assert _best_ious(parts, [long_worm, ends_on_it, crosses])[0] > 0.95
    grid = [
        _bar(CLUMP_SHAPE, (60, 20), (60, 180)),
        _bar(CLUMP_SHAPE, (140, 20), (140, 180)),
        _bar(CLUMP_SHAPE, (20, 40), (180, 40)),
        _bar(CLUMP_SHAPE, (20, 160), (180, 160)),
    ]
    parts = untangle_clump(np.any(grid, axis=0))
    assert parts is not None and len(parts) == 4
    assert _best_ious(parts, grid)[0] > 0.9


def test_clumps_that_are_not_clear_are_left_whole():
    worms = _clump_of_three()
    assert untangle_clump(np.any(worms, axis=0), max_worms=2) is None
    # no pair of arms is straight enough to be one worm through a crossing
    assert untangle_clump(np.any(worms, axis=0), max_bend_cos=-1.5) is None
    # one crossing is untangle_segment's job; a lone worm is no clump
    assert untangle_clump(worms[0] | worms[1]) is None
    assert untangle_clump(worms[0]) is None
    assert untangle_clump(np.zeros(CLUMP_SHAPE, bool)) is None


def test_untangle_cuts_clumps_only_when_asked():
    worms = _clump_of_three()
    singles = [_bar(CLUMP_SHAPE, (130 + 12 * i, 10), (130 + 12 * i, 60)) for i in range(4)]
    masks = np.stack([*singles, np.any(worms, axis=0)])
    inst = Instances(masks=masks, scores=np.full(5, 0.8, np.float32))
    assert untangle(inst, clumps=False) is inst
    out = untangle(inst)
    assert len(out) == 7
    assert np.array_equal(out.masks[:4], masks[:4])
    assert _best_ious(list(out.masks[4:]), worms)[0] > 0.95


def _lambda(shape, apex=(20, 100), feet=((180, 40), (180, 160))):
    """Two worms whose tips touch at ``apex``: a Λ."""
    return [_bar(shape, foot, apex) for foot in feet]


def test_worms_meeting_tip_to_tip_at_an_angle_are_cut_at_the_kink():
    worms = _lambda(CLUMP_SHAPE)
    merged = np.any(worms, axis=0)
    assert untangle_segment(merged) is None and untangle_clump(merged) is None  # no junction
    parts = cut_at_kink(merged)
    assert parts is not None and len(parts) == 2
    assert _best_ious(parts, worms)[0] > 0.9
    assert cut_at_kink(merged, min_kink_cos=0.9) is None  # the Λ is ~41 deg: not that sharp


def test_smooth_bends_and_right_angles_are_no_kink():
    yy, xx = np.mgrid[: CLUMP_SHAPE[0], : CLUMP_SHAPE[1]]
    radius = np.hypot(yy - 100, xx - 100)
    arc = (np.abs(radius - 60) <= 4) & (yy <= 100)  # half a ring: one worm bent smoothly
    assert cut_at_kink(arc) is None
    elbow = _bar(CLUMP_SHAPE, (20, 40), (120, 40)) | _bar(CLUMP_SHAPE, (120, 40), (120, 160))
    assert cut_at_kink(elbow) is None  # cos 0 < 0.3
    assert cut_at_kink(_bar(CLUMP_SHAPE, (20, 20), (180, 180))) is None
    assert cut_at_kink(np.any(_clump_of_three(), axis=0)) is None  # branched: not its job


def test_a_second_round_reads_segments_against_the_median_of_the_first_cuts():
    # the clumps and Λs inflate the first median so much that only the clumps stand out;
    # once they are cut into worms, the Λs are twice the typical worm and are cut too
    single = _bar(CLUMP_SHAPE, (20, 20), (180, 20))
    clump = np.any(_clump_of_three(), axis=0)
    lam = np.any(_lambda(CLUMP_SHAPE), axis=0)

    def left(m):
        return np.pad(m, ((0, 0), (0, 200)))

    def right(m):  # a second worm or clump of the same shape beside the first
        return np.pad(m, ((0, 0), (200, 0)))

    masks = np.stack([left(single), left(lam), right(lam), left(clump), right(clump)])
    inst = Instances(masks=masks, scores=np.full(5, 0.8, np.float32))
    once = untangle(inst, rounds=1)
    assert len(once) == 1 + 2 + 3 + 3  # the clumps only
    twice = untangle(inst)
    assert len(twice) == 1 + 2 * 2 + 3 + 3
    assert len(untangle(inst, min_kink_cos=None)) == len(once)
    assert _best_ious(list(twice.masks), [left(m) for m in _lambda(CLUMP_SHAPE)])[0] > 0.9


def test_a_spur_at_the_junction_of_worms_end_to_end_does_not_keep_them_merged():
    # two worms end to end with a stub of outline sticking out where they meet: read with
    # the default pruning the stub is a third "worm" too small to keep, so the segment is
    # read again with longer spurs pruned, as an unbranched pair cut at its waist
    worms = [_bar(CLUMP_SHAPE, (100, 5), (100, 95)), _bar(CLUMP_SHAPE, (100, 105), (100, 195))]
    waist = _bar(CLUMP_SHAPE, (100, 95), (100, 105), radius=2)
    stub = _bar(CLUMP_SHAPE, (100, 100), (78, 100), radius=2)
    merged = np.any(worms, axis=0) | waist | stub
    parts = untangle_segment(merged)
    assert parts is not None and min(p.sum() for p in parts) < 0.1 * merged.sum()
    single = _bar(CLUMP_SHAPE, (10, 10), (10, 100))
    inst = Instances(masks=np.stack([single, single, merged]), scores=np.full(3, 0.8, np.float32))
    assert untangle(inst, reprune_widths=None) is inst  # the stub reading is refused
    out = untangle(inst)
    assert len(out) == 4
    assert _best_ious(list(out.masks[2:]), worms)[0] > 0.85


def test_a_pinhole_where_worms_meet_does_not_ring_the_skeleton():
    # a speck of background left inside the segment where one worm meets another makes a
    # small loop in the skeleton, and a loop is no simple crossing; filled, the T is read
    a = _bar(CLUMP_SHAPE, (100, 10), (100, 190), radius=5)
    b = _bar(CLUMP_SHAPE, (10, 60), (100, 130), radius=5)  # ends on a
    yy, xx = np.ogrid[: CLUMP_SHAPE[0], : CLUMP_SHAPE[1]]
    pinhole = (yy - 100) ** 2 + (xx - 90) ** 2 <= 4
    merged = (a | b) & ~pinhole
    parts = untangle_segment(merged)
    assert parts is not None and _best_ious(parts, [a, b])[0] > 0.9
    assert not any(p[pinhole].any() for p in parts)  # the hole stays background
    ring = (np.hypot(yy - 100, xx - 100) <= 60) & (np.hypot(yy - 100, xx - 100) >= 50)
    skeleton = _cropped_skeleton(ring)  # a ring of worm encloses far more than a pinhole
    assert skeleton is not None and _path_order(skeleton.skeleton) is None  # still a loop


def test_no_cut_where_the_segment_shares_a_crossing_with_another_worm():
    a = _bar(SHAPE, (80, 5), (80, 79))
    b = _bar(SHAPE, (80, 81), (80, 155))
    merged = a | b
    boundary = np.full(SHAPE, 0.5, np.float32)
    boundary[:, 78:83] = 0.95  # a peak, and also where another worm crosses
    crossing = _bar(SHAPE, (20, 80), (140, 80)) & merged
    assert cut_end_to_end(merged, typical_length=70, boundary=boundary) is not None
    assert cut_end_to_end(merged, 70, boundary=boundary, shared=crossing) is None
    # a waist inside the crossing is no cut either; one away from it still is
    waisted = merged.copy()
    waisted[:78, 77:84] = waisted[83:, 77:84] = False  # 5 px wide there, 9 elsewhere
    assert cut_end_to_end(waisted, typical_length=70) is not None
    assert cut_end_to_end(waisted, typical_length=70, shared=crossing) is None
    vee = np.any(_lambda(CLUMP_SHAPE), axis=0)
    tip = np.argwhere(np.all(_lambda(CLUMP_SHAPE), axis=0)).mean(axis=0).astype(int)
    at_tip = np.zeros(CLUMP_SHAPE, bool)  # the whole bend
    at_tip[tip[0] - 20 : tip[0] + 21, tip[1] - 20 : tip[1] + 21] = True
    assert cut_at_kink(vee) is not None and cut_at_kink(vee, shared=at_tip & vee) is None


def test_a_long_worm_read_out_of_a_crossing_is_not_cut_at_the_crossing():
    # the horizontal worm is 1.5x the others' length: a candidate for an end-to-end cut in
    # the second round, where the crossing makes a boundary peak in its middle
    singles = [_bar(SHAPE, (5, 8 + 14 * i), (60, 8 + 14 * i)) for i in range(5)]
    long_worm = _bar(SHAPE, (110, 5), (110, 90))
    short_worm = _bar(SHAPE, (80, 48), (140, 48))
    boundary = np.full(SHAPE, 0.2, np.float32)
    boundary[100:121, 40:57] = 0.95
    inst = Instances(masks=np.stack([*singles, long_worm | short_worm]))
    out = untangle(inst, boundary=boundary)
    assert len(out) == 7
    assert _best_ious(list(out.masks[5:]), [long_worm, short_worm])[0] > 0.85
    # the same worm alone, not out of a crossing, is cut at the peak
    alone = Instances(masks=np.stack([*singles, long_worm]))
    assert len(untangle(alone, boundary=boundary)) == 7


def _cut_off_crossing():
    """An X whose fourth arm the boundary map cut off: worm a, b's stub with a, b's rest."""
    a = _bar(SHAPE, (20, 20), (140, 140))
    b = _bar(SHAPE, (20, 135), (140, 25))
    rows = np.arange(SHAPE[0])[:, None]
    segment = a | (b & (rows <= 84))  # a, the crossing and b's upper arm
    rest = b & ~segment  # b's lower arm, touching the segment below the crossing
    return a, b, segment, rest


def _with_singles(*masks):
    """The masks widened to the right, beside five single worms of a worm's length."""
    masks = [np.pad(m, ((0, 0), (0, 100))) for m in masks]
    shape = masks[0].shape
    singles = [_bar(shape, (5, 170 + 18 * i), (155, 170 + 18 * i)) for i in range(5)]
    inst = Instances(masks=np.stack([*singles, *masks]), scores=np.full(5 + len(masks), 0.8))
    return inst, masks


def test_a_crossing_whose_fourth_arm_is_a_segment_of_its_own_is_read_as_four_arms():
    a, b, segment, rest = _cut_off_crossing()
    inst = Instances(
        masks=np.stack([segment, rest]),
        scores=np.array([0.9, 0.7], np.float32),
        classes=np.array([1, 2]),
        seeds=np.array([[80, 80], [130, 35]]),
        taus=np.array([0.4, 0.6], np.float32),
    )
    out = join_cut_arms(inst)
    assert len(out) == 2
    assert _iou(out.masks[0], a) > 0.93 and _iou(out.masks[1], b) > 0.93
    crossing = a & b
    assert (out.masks[0] & out.masks[1] & crossing).sum() >= 0.8 * crossing.sum()  # both keep it
    assert np.allclose(out.scores, [0.9, 0.7]) and list(out.classes) == [1, 2]
    assert np.allclose(out.taus, [0.4, 0.6])
    for mask, seed in zip(out.masks, out.seeds, strict=True):
        assert mask[seed[0], seed[1]]
    # in the pipeline: without the reading the three-armed segment gives a and b's stub,
    # and b's lower arm stays a worm of its own
    inst, (a, b) = _with_singles(segment, rest)[0], _with_singles(a, b)[1]
    joined = untangle(inst)
    assert len(joined) == 7
    assert _best_ious(list(joined.masks[5:]), [a, b])[0] > 0.93
    alone = untangle(inst, join_arms=False)
    assert max(_iou(m, b) for m in alone.masks) < 0.7


def test_no_four_arm_reading_where_the_neighbour_does_not_continue_an_arm():
    a, b, segment, rest = _cut_off_crossing()
    # a neighbour ending at the junction square to the arms: no straight pair for it
    square = _bar(SHAPE, (80, 86), (80, 150)) & ~segment
    inst = Instances(masks=np.stack([segment, square]), scores=np.full(2, 0.8, np.float32))
    assert join_cut_arms(inst) is inst
    # two neighbours ending there: which one is the fourth arm is not clear
    other = _bar(SHAPE, (140, 90), (95, 85)) & ~segment & ~rest
    inst = Instances(masks=np.stack([segment, rest, other]), scores=np.full(3, 0.8, np.float32))
    assert join_cut_arms(inst) is inst
    # a neighbour that ends far from the junction is no arm of it
    far = rest & (np.arange(SHAPE[0])[:, None] > 115)
    inst = Instances(masks=np.stack([segment, far]), scores=np.full(2, 0.8, np.float32))
    assert join_cut_arms(inst) is inst
    # segments smaller than min_area are not read
    inst = Instances(masks=np.stack([segment, rest]), scores=np.full(2, 0.8, np.float32))
    assert join_cut_arms(inst, min_area=segment.sum() + 1) is inst
