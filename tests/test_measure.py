import numpy as np
import pytest
from skimage.draw import line

from napari_instseg.core.measure import measure, skeleton_length
from napari_instseg.core.types import Instances


def test_skeleton_length_straight_diagonal_and_branch():
    m = np.zeros((40, 40), bool)
    rr, cc = line(5, 5, 30, 30)
    m[rr, cc] = True
    assert skeleton_length(m) == pytest.approx(25 * np.sqrt(2) + 1)
    m[18, 18:24] = True  # a side branch does not add to the longest path
    assert skeleton_length(m) == pytest.approx(25 * np.sqrt(2) + 1, abs=1.5)
    assert skeleton_length(np.zeros((5, 5), bool)) == 0.0


def _worms():
    masks = np.zeros((3, 40, 60), bool)
    masks[0, 5:10, 5:55] = True  # 5 x 50 bar
    masks[1, 20:26, 10:40] = True
    masks[2, 30:36, 20:30] = True
    return masks


def test_measure_columns_and_values():
    masks = _worms()
    image = np.full((40, 60), 10.0)
    image[masks[0]] = 50.0
    w1 = np.random.default_rng(0).normal(100, 2, (40, 60))
    w1[masks[1]] = 400.0  # the glowing (dead) worm
    inst = Instances(masks, scores=np.array([0.9, 0.8, 0.7]))
    df = measure(inst, image=image, channels={"w1": w1})
    assert list(df["label"]) == [1, 2, 3]
    assert list(df["area"]) == [250, 180, 60]
    assert df.loc[0, "length"] == pytest.approx(47, abs=3)  # skeleton stops short of the ends
    assert df.loc[0, "width"] == pytest.approx(250 / df.loc[0, "length"])
    assert df.loc[0, "solidity"] == pytest.approx(1.0)  # a bar is its own convex hull
    bent = np.zeros((40, 60), bool)
    bent[5:9, 5:50] = True
    bent[5:35, 46:50] = True  # an "L": half its hull is empty
    assert measure(Instances(bent[None])).loc[0, "solidity"] < 0.6
    assert df.loc[0, "mean_intensity"] == 50.0 and df.loc[1, "mean_intensity"] == 10.0
    assert df.loc[
        0, ["bbox_min_row", "bbox_min_col", "bbox_max_row", "bbox_max_col"]
    ].tolist() == [5, 5, 10, 55]
    assert df.loc[0, "centroid_row"] == pytest.approx(7.0)
    assert df["score"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert df["dead"].tolist() == [False, True, False]
    assert 100 < df.attrs["dead_threshold"] < 400
    df2 = measure(inst, channels={"w1": w1}, dead_threshold=50.0)
    assert df2["dead"].all()


def test_measure_multichannel_and_errors():
    masks = _worms()
    df = measure(Instances(masks), image=np.ones((2, 40, 60)))
    assert {"mean_intensity_0", "mean_intensity_1"} <= set(df.columns)
    assert "dead" not in df.columns
    with pytest.raises(ValueError, match="does not match"):
        measure(Instances(masks), image=np.ones((30, 60)))
    with pytest.raises(ValueError, match="channel"):
        measure(Instances(masks), channels={"w1": np.ones((3, 3))})
    with pytest.raises(ValueError, match="Instances"):
        measure(masks)
    assert len(measure(Instances(np.zeros((0, 5, 5), bool)))) == 0


def test_measure_bbbc010_dead_worms(bbbc010_root):
    from napari_instseg.core.io import read_bbbc010

    s = read_bbbc010(bbbc010_root, wells=["A13", "A05"])
    all_dead = measure(Instances(s[0].masks), s[0].image, s[0].channels)
    mostly_live = measure(Instances(s[1].masks), s[1].image, s[1].channels)
    assert all_dead["dead"].mean() > 0.8 and mostly_live["dead"].mean() < 0.2
    assert 80 < mostly_live["length"].median() < 250
