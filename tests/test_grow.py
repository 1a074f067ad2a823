import warnings

import numpy as np
import pytest
from scipy import ndimage

from napari_instseg.core.grow import Grower, d2_threshold, get_grower, grow, similarity
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.types import Prediction


def _masks(shape=(64, 80)):
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    c = np.zeros(shape, bool)
    d = np.zeros(shape, bool)
    a[28:36, 4:60] = True  # horizontal worm ...
    b[4:60, 28:36] = True  # ... crossed by a vertical one
    c[44:50, 40:76] = True  # c and d touch (no gap, no shared pixels)
    d[50:56, 40:76] = True
    return np.stack([a, b, c, d])


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def oracle():
    masks = _masks()
    return masks, prediction_from_masks(masks, embedding_dim=8, seed=0)


def test_d2_threshold_matches_similarity_definition():
    for tau in (0.1, 0.5, 0.9):
        d2 = d2_threshold(tau)
        assert 2 / (1 + np.exp(d2)) == pytest.approx(tau)
    for bad in (0, 1, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            d2_threshold(bad)
    for bad in (None, "high", [0.5]):  # not a number: said so, with the name tau
        with pytest.raises(ValueError, match=r"tau must be a number strictly between 0 and 1"):
            d2_threshold(bad)


def test_similarity_formula(oracle):
    _, p = oracle
    sim = similarity(p, (30, 10))
    e = p.embeddings
    ref = 2 / (1 + np.exp(((e - e[:, 30, 10][:, None, None]) ** 2).sum(0)))
    np.testing.assert_allclose(sim, ref, atol=1e-5)
    assert sim[30, 10] == pytest.approx(1.0) and sim.dtype == np.float32


def test_grow_keeps_both_crossing_worms_whole(oracle):
    masks, p = oracle
    a = grow(p, (31, 10))  # left arm of the horizontal worm
    b = grow(p, (10, 31))  # top arm of the vertical worm
    np.testing.assert_array_equal(a, masks[0])
    np.testing.assert_array_equal(b, masks[1])
    assert (a & b).sum() == (masks[0] & masks[1]).sum() == 64
    # without bridging the crossing cuts the worm: only the clicked arm survives
    cut = grow(p, (31, 10), bridge_overlaps=False)
    assert cut.sum() < 0.5 * masks[0].sum() and not cut[31, 50]
    # the barrier does not cut at the crossing worm's contours
    np.testing.assert_array_equal(grow(p, (31, 10), boundary_barrier=0.5), masks[0])


def test_grow_several_seeds_union_and_negative(oracle):
    masks, p = oracle
    both = grow(p, [(46, 50), (52, 50)])
    np.testing.assert_array_equal(both, masks[2] | masks[3])
    # make c and d look alike (an embedding failure); a negative seed on d splits them
    emb = p.embeddings.copy()
    emb[:, masks[3]] = emb[:, 46, 50][:, None]
    bad = Prediction(emb, p.seediness, p.class_scores, p.boundary, p.foreground)
    merged = grow(bad, (46, 50))
    assert merged[52, 50]
    emb[:, masks[3]] += np.float32(0.3)  # slightly different, still similar at tau 0.5
    bad = Prediction(emb, p.seediness, p.class_scores, p.boundary, p.foreground)
    assert grow(bad, (46, 50))[52, 50]
    fixed = grow(bad, (46, 50), negative=[(52, 50)])
    np.testing.assert_array_equal(fixed, masks[2])


def test_grow_boundary_barrier_separates_touching_lookalikes(oracle):
    masks, p = oracle
    emb = p.embeddings.copy()
    emb[:, masks[3]] = emb[:, 46, 50][:, None]  # c and d identical embeddings
    bad = Prediction(emb, p.seediness, p.class_scores, p.boundary, p.foreground)
    assert _iou(grow(bad, (46, 50)), masks[2] | masks[3]) == 1.0
    sep = grow(bad, (46, 50), boundary_barrier=0.5)
    assert _iou(sep, masks[2]) > 0.8 and sep[46, 50] and not sep[54, 50]


def test_grow_connected_drops_far_lookalikes():
    shape = (40, 60)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[5:10, 5:30] = True
    b[28:33, 20:55] = True
    p = prediction_from_masks(np.stack([a, b]), seed=2)
    p.embeddings[:, b] = p.embeddings[:, 7, 10][:, None]  # far away, same embedding
    g = Grower(p)
    assert g.grow((7, 10), connected=False, bridge_overlaps=False)[30, 40]
    np.testing.assert_array_equal(g.grow((7, 10)), a)


def test_grow_tau_monotone_and_noise():
    masks = _masks()
    p = prediction_from_masks(masks, embedding_dim=16, noise=0.08, seed=4)
    sizes = [grow(p, (31, 10), tau=t).sum() for t in (0.2, 0.5, 0.8)]
    assert sizes[0] >= sizes[1] >= sizes[2]
    assert _iou(grow(p, (31, 10), tau=0.5), masks[0]) > 0.9


def test_grower_cache_reused(oracle):
    _, p = oracle
    assert get_grower(p) is get_grower(p)
    g = Grower(p)
    assert get_grower(g) is g
    np.testing.assert_array_equal(grow(g, (31, 10)), grow(p, (31, 10)))


def test_grow_bad_input(oracle):
    _, p = oracle
    with pytest.raises(ValueError, match="outside the image"):
        grow(p, (64, 10))
    with pytest.raises(ValueError, match="outside the image"):
        grow(p, (10, -1))
    with pytest.raises(ValueError, match="outside the image"):
        grow(p, (31, 10), negative=[(0, 500)])
    with pytest.raises(ValueError, match="tau"):
        grow(p, (31, 10), tau=1.0)
    with pytest.raises(ValueError, match="at least one"):
        grow(p, [])
    with pytest.raises(ValueError, match="pairs"):
        grow(p, [(1, 2, 3)])
    with pytest.raises(ValueError, match="one"):
        similarity(p, [(1, 2), (3, 4)])
    emb = p.embeddings.copy()
    emb[0, 3, 3] = np.nan
    nan = Prediction(emb, p.seediness, p.class_scores, p.boundary, p.foreground)
    with pytest.raises(ValueError, match="NaN"):
        grow(nan, (31, 10))
    empty = Prediction(
        np.zeros((0, 4, 4), np.float32),
        np.zeros((4, 4), np.float32),
        np.zeros((4, 2, 4, 4), np.float32),
        np.zeros((4, 4), np.float32),
        np.zeros((4, 4), np.float32),
    )
    with pytest.raises(ValueError, match="empty"):
        grow(empty, (1, 1))
    with pytest.raises(ValueError, match="Prediction"):
        grow(np.zeros((3, 4, 4)), (1, 1))


def test_bench_runs_small_and_writes_section(tmp_path):
    from napari_instseg.cli.bench import END, START, run_bench, to_markdown, write_section

    res = run_bench(repeats=2, size=(96, 128), dim=4)
    assert {"grow", "grow_edges", "click_from_segments", "similarity", "floor_matvec"} <= set(
        res["timings"]
    )
    t = res["timings"]["grow"]
    assert t["ratio_to_floor"] == pytest.approx(
        t["median_ms"] / res["timings"]["floor_matvec"]["median_ms"]
    )
    assert set(res["accuracy"]) == {"seeds", "boundary", "hybrid"}
    scoring = res["timings"]["evaluate_50"]
    assert scoring["median_ms"] > 0 and "ratio_to_floor" not in scoring
    doc = tmp_path / "b.md"
    doc.write_text(f"# B\n\n## X\n\n{START}\nold\n{END}\n\n## After\n")
    write_section(doc, to_markdown(res))
    text = doc.read_text()
    assert "old" not in text and "| grow |" in text and text.endswith("## After\n")
    assert "| evaluate_50 |" in text


def test_bench_times_the_network_with_and_without_tta(tmp_path):
    from napari_instseg.cli.bench import run_bench
    from napari_instseg.core.model import InstSegNet, ModelConfig
    from napari_instseg.core.weights import save_model

    net = InstSegNet(ModelConfig(channels=(4, 8), embedding_dim=4, head_channels=4))
    path = save_model(net, tmp_path / "tiny.safetensors")
    res = run_bench(repeats=2, model=str(path), size=(64, 96), dim=4, device="cpu")
    assert res["prediction"] == f"model {path}"
    assert {"predict", "predict_tta8"} <= set(res["timings"])
    assert all(res["timings"][k]["median_ms"] > 0 for k in ("predict", "predict_tta8"))


def test_a_click_on_the_background_grows_nothing():
    # background pixels' embeddings are alike: unclipped, a click there floods them all
    masks = _masks()
    prediction = prediction_from_masks(masks, embedding_dim=8, seed=0)
    background = ~masks.any(0)
    pixel = tuple(int(v) for v in np.argwhere(background)[0])
    flood = grow(prediction, pixel, clip_to_foreground=False, bridge_overlaps=False)
    assert (flood & background).sum() > 0.5 * background.sum()
    mask = grow(prediction, pixel)
    assert mask.sum() == 1 and mask[pixel]
    # a faint object (foreground 0.05-0.5) is still grown, within the floor
    prediction.foreground[masks[2]] = 0.2
    faint = grow(prediction, (46, 50))
    np.testing.assert_array_equal(faint, masks[2])


def test_grow_is_clipped_to_the_foreground_map():
    # embeddings that bleed two pixels past the worm (as a network's do), a sharp foreground
    masks = _masks()
    worm = masks[2]
    blurred = prediction_from_masks(masks, embedding_dim=8, seed=0)
    from scipy import ndimage

    halo = ndimage.binary_dilation(worm, iterations=2) & ~masks.any(0)
    blurred.embeddings[:, halo] = blurred.embeddings[:, 46, 50][:, None]
    fg = masks.any(0).astype(np.float32) * 0.6  # a foreground map that peaks at 0.6
    blurred.foreground[...] = fg
    grower = Grower(blurred)
    assert grower.default_fg_threshold == 0.5  # no tuned parameters in the metadata
    unclipped = grower.grow((46, 50), clip_to_foreground=False)
    assert (unclipped & halo).sum() > 50
    clipped = grower.grow((46, 50))
    np.testing.assert_array_equal(clipped, worm)
    # the model's tuned threshold is the default
    blurred.metadata = {"segment_params": {"boundary": {"fg_threshold": 0.55}}}
    np.testing.assert_array_equal(Grower(blurred).grow((46, 50)), worm)
    blurred.foreground[worm] = 0.5  # now below it: clipped to the floor only
    blurred.foreground[halo] = 0.1
    np.testing.assert_array_equal(Grower(blurred).grow((46, 50)), unclipped)
    blurred.foreground[...] = fg
    # an object the model half missed (its clicked pixel below the threshold) is clipped to
    # the floor: the halo, background to the model, stays out
    np.testing.assert_array_equal(grower.grow((46, 50), fg_threshold=0.7), worm)
    np.testing.assert_array_equal(grower.grow((46, 50), fg_threshold=0.7, fg_floor=0.0), unclipped)
    with pytest.raises(ValueError, match="fg_floor"):
        grower.grow((46, 50), fg_floor=1.0)
    with pytest.raises(ValueError, match="fg_threshold"):
        grower.grow((46, 50), fg_threshold=1.0)


def test_grow_instances_one_per_worm(oracle):
    from napari_instseg.core.grow import WormSeeds, grow_instances

    masks, p = oracle
    worms = [WormSeeds(((31, 10),)), WormSeeds(((46, 50),), ((52, 50),))]
    inst = grow_instances(p, worms, tau=0.5)
    assert len(inst) == 2 and inst.taus.tolist() == [0.5, 0.5]
    np.testing.assert_array_equal(inst.masks[0], grow(p, (31, 10)))
    np.testing.assert_array_equal(inst.masks[1], grow(p, (46, 50), negative=(52, 50)))
    _, classes, scores = p.best_tau_class()
    assert inst.scores[1] == pytest.approx(scores[46, 50]) and inst.classes[0] == classes[31, 10]
    assert inst.seeds.tolist() == [[31, 10], [46, 50]]
    assert len(grow_instances(p, [])) == 0
    with pytest.raises(ValueError, match="worm 1 has no positive seed"):
        grow_instances(p, [WormSeeds((), ((1, 1),))])


def test_grow_instances_leaves_out_seeds_on_background(oracle):
    from napari_instseg.core.grow import (
        FG_FLOOR,
        BackgroundSeedWarning,
        WormSeeds,
        background_seeds,
        grow_instances,
    )

    masks, p = oracle
    background = tuple(map(int, np.argwhere(p.foreground < FG_FLOOR)[0]))
    assert background_seeds(p.foreground, [(31, 10), background, (-1, 5)]) == [background]
    worms = [WormSeeds(((31, 10), background)), WormSeeds((background,))]
    with pytest.warns(BackgroundSeedWarning) as caught:
        inst = grow_instances(p, worms, tau=0.5)
    assert [str(w.message).split(":")[0] for w in caught] == ["worm 1", "worm 2"]
    assert "its mask is empty" in str(caught[1].message)
    # the worm keeps its seed on the worm; the one with none left is empty, score 0
    np.testing.assert_array_equal(inst.masks[0], grow(p, (31, 10)))
    assert not inst.masks[1].any() and inst.scores[1] == 0 and inst.scores[0] > 0
    assert inst.seeds.tolist() == [[31, 10], list(background)]
    # unclipped masks were asked for: the seed is kept (and grows into the background)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unclipped = grow_instances(p, worms[1:], clip_to_foreground=False)
    assert unclipped.masks[0].sum() > 1


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 12, 40])
@pytest.mark.parametrize("shape", [(1, 1), (3, 50), (64, 48)])
def test_chessboard_dilation_is_a_square_maximum_filter(radius, shape):
    from scipy import ndimage

    from napari_instseg.core.grow import chessboard_dilation

    rng = np.random.default_rng(radius + shape[0])
    mask = rng.random(shape) > 0.97
    mask[0, 0] = radius % 2 == 0  # pixels on the border too
    expected = ndimage.maximum_filter(mask, size=2 * radius + 1, mode="constant", cval=0)
    got = chessboard_dilation(mask, radius)
    assert got.dtype == bool and got.shape == shape
    np.testing.assert_array_equal(got, expected)


def test_foreground_subset_follows_the_threshold(oracle):
    _, pred = oracle
    grower = Grower(pred)
    for threshold in (0.5, 0.2, 0.5):
        index, columns = grower.foreground_pixels(threshold)
        np.testing.assert_array_equal(
            index, np.flatnonzero(np.asarray(pred.foreground).reshape(-1) >= threshold)
        )
        np.testing.assert_array_equal(columns[:-1], grower.flat[:, index])
        half_sq = 0.5 * (grower.flat[:, index].astype(np.float64) ** 2).sum(axis=0)
        np.testing.assert_allclose(columns[-1], -half_sq, rtol=1e-6)


def test_grower_reads_the_embeddings_without_a_copy(oracle, monkeypatch):
    """The grow cache is a view of float32 embeddings (1.4 GB at 4160 x 5568), and a
    growth over every pixel (not clipped to the foreground) made a block of columns at a
    time gives the same mask for any block size, and the pixels within the threshold."""
    from napari_instseg.core import grow as grow_module

    _, pred = oracle
    grower = Grower(pred)
    assert np.shares_memory(grower.flat, pred.embeddings)
    assert np.shares_memory(grower.foreground, pred.foreground)
    fg, bd = pred.foreground.copy(), pred.boundary.copy()
    fg[3, 4] = bd[5, 6] = np.nan  # NaN maps: read as background and as boundary, on a copy
    odd = Grower(Prediction(pred.embeddings, pred.seediness, pred.class_scores, bd, fg))
    assert odd.foreground[3, 4] == 0.0 and odd.boundary[5, 6] == 1.0
    assert np.isnan(fg[3, 4]) and np.isnan(bd[5, 6])
    np.testing.assert_array_equal(odd.foreground[5:], pred.foreground[5:])
    h, w = grower.shape
    seeds = [(31, 10), (10, 31)]
    options = {"clip_to_foreground": False, "connected": False, "bridge_overlaps": False}
    whole = grower.grow(seeds, tau=0.5, **options)
    monkeypatch.setattr(grow_module, "_BLOCK", 1000)  # 5 blocks and a part
    np.testing.assert_array_equal(grower.grow(seeds, tau=0.5, **options), whole)
    d2 = grower.sq_dist(grower.vectors(np.array(seeds))).min(axis=0).reshape(h, w)
    thr = d2_threshold(0.5)
    clear = np.abs(d2 - thr) > 1e-4  # away from float32 rounding of the threshold
    np.testing.assert_array_equal(whole[clear], (d2 <= thr)[clear])
    assert whole.any() and not whole.all()


def _whole_image_components(near, rows, cols, start=64):
    """Reference of ``seed_components``: label all of ``near`` (the code before session 27)."""
    from scipy import ndimage

    parts, _ = ndimage.label(near, np.ones((3, 3), bool))
    ids = np.unique(parts[rows, cols])
    found = np.isin(parts, ids)
    r = np.flatnonzero(found.any(axis=1))
    c = np.flatnonzero(found.any(axis=0))
    box = (int(r[0]), int(r[-1]) + 1, int(c[0]), int(c[-1]) + 1)
    return found[box[0] : box[1], box[2] : box[3]], box


@pytest.mark.parametrize("seed", range(6))
def test_seed_components_in_a_window_match_the_whole_image(seed):
    from napari_instseg.core.grow import seed_components

    rng = np.random.default_rng(seed)
    near = rng.random((90, 120)) < 0.45  # near percolation: long winding components
    near[40:45, :] = seed % 2 == 0  # a component across the whole width, or none
    on = np.argwhere(near)
    for k in rng.choice(len(on), 8, replace=False):
        rows, cols = on[[k]][:, 0], on[[k]][:, 1]
        for start in (1, 3, 64):  # tiny windows must grow (doubling) to the same answer
            got, box = seed_components(near, rows, cols, start=start)
            want, want_box = _whole_image_components(near, rows, cols)
            assert box == want_box
            np.testing.assert_array_equal(got, want)
    rows, cols = on[:3, 0], on[:3, 1]  # several seeds
    got, box = seed_components(near, rows, cols, start=2)
    want, want_box = _whole_image_components(near, rows, cols)
    assert box == want_box
    np.testing.assert_array_equal(got, want)


def test_with_pixels_is_union1d():
    from napari_instseg.core.grow import _with_pixels

    rng = np.random.default_rng(0)
    index = np.unique(rng.integers(0, 10_000, 3000))
    for pixels in (index[[5, 7]], np.array([3, 9999, 3, 5000]), np.array([index[0], -1 + 0])):
        pixels = np.abs(pixels)
        np.testing.assert_array_equal(_with_pixels(index, pixels), np.union1d(index, pixels))
    np.testing.assert_array_equal(_with_pixels(index[:0], np.array([4])), [4])


def test_grow_on_a_mosaic_of_lookalikes_matches_the_whole_image_labelling(monkeypatch):
    """Look-alike worms all over a large image make the similarity mask's extent the whole
    image; the click's worm is found in a window around it (and its crossing pixels from
    anchors within ``ANCHOR_REACH``, all of this image): the masks equal those of labelling
    the whole extent."""
    from napari_instseg.core import grow as grow_module
    from napari_instseg.core.synthetic import make_worms

    tiles = [
        make_worms(shape=(96, 96), n_worms=4, n_crossings=1, length=(30, 60), seed=s)
        for s in range(4)
    ]
    masks = []
    for k, t in enumerate(tiles):  # a 2 x 2 mosaic, every tile's worms in place
        for m in t.masks:
            full = np.zeros((192, 192), bool)
            r, c = divmod(k, 2)
            full[96 * r : 96 * r + 96, 96 * c : 96 * c + 96] = m
            masks.append(full)
    masks = np.stack(masks)
    p = prediction_from_masks(masks, embedding_dim=8, noise=0.1, seed=1)
    # tile 3 repeats tile 0's embeddings: look-alikes far from every click on tile 0
    p.embeddings[:, 96:, 96:] = p.embeddings[:, :96, :96]
    clicks = [tuple(np.argwhere(m)[len(np.argwhere(m)) // 2]) for m in masks]
    far = Grower(p).grow(clicks[0], connected=False, bridge_overlaps=False)
    assert far[96:, 96:].any()  # the similarity mask's extent: the whole image
    taus = (0.3, 0.6)
    new = [grow(Grower(p), [c], tau=t, edge_thresholds=None) for c in clicks for t in taus]
    two = [clicks[0], clicks[1]]
    new.append(grow(Grower(p), two, negative=[clicks[2]], edge_thresholds=None))
    monkeypatch.setattr(grow_module, "seed_components", _whole_image_components)
    # and the crossing radius around the whole mask dilated at once (before session 29)
    whole = grow_module.chessboard_dilation
    monkeypatch.setattr(grow_module, "_NearMask", lambda mask, radius: whole(mask, radius))
    old = [grow(Grower(p), [c], tau=t, edge_thresholds=None) for c in clicks for t in taus]
    old.append(grow(Grower(p), two, negative=[clicks[2]], edge_thresholds=None))
    for a, b in zip(new, old, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("radius", [0, 1, 2, 5, 12, 13])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 50), (64, 48), (37, 29)])
def test_grid_and_window_dilation_match_the_whole_dilation(radius, shape):
    """The crossing radius around the mask, read at every second pixel (the anchors) or in
    windows (the seeds' part, edges of the image included), equals the whole dilation."""
    from napari_instseg.core.grow import _NearMask, chessboard_dilation, grid_dilation

    rng = np.random.default_rng(radius * 100 + shape[0])
    for density in (0.003, 0.03, 0.3):
        mask = rng.random(shape) < density
        mask[-1, -1] = True  # the last row and column (odd sizes: on the grid or not)
        whole = chessboard_dilation(mask, radius)
        np.testing.assert_array_equal(grid_dilation(mask, radius), whole[::2, ::2])
        near = _NearMask(mask, radius)
        assert near.shape == shape
        np.testing.assert_array_equal(near[::2, ::2], whole[::2, ::2])
        for _ in range(10):
            a0, a1 = sorted(rng.integers(0, shape[0] + 1, 2))
            b0, b1 = sorted(rng.integers(0, shape[1] + 1, 2))
            np.testing.assert_array_equal(near[a0:a1, b0:b1], whole[a0:a1, b0:b1])
            # every second pixel of a window (the anchors near the tested pixels)
            np.testing.assert_array_equal(near[a0:a1:2, b0:b1:2], whole[a0:a1:2, b0:b1:2])
        np.testing.assert_array_equal(near[0 : shape[0], 0 : shape[1]], whole)


def test_similarity_window_is_the_whole_map_sliced(oracle):
    """The live preview's window (every step-th pixel, edges included) holds the values of
    the whole similarity map there."""
    _, pred = oracle
    grower = Grower(pred)
    h, w = grower.shape
    p = (h // 2, w // 3)
    whole = grower.similarity(p)
    for box, step in [
        ((0, h, 0, w), 1),
        ((0, h, 0, w), 3),
        ((5, 17, h // 4, w - 1), 2),
        ((h - 7, h + 40, w - 9, w + 5), 4),  # past the image: clipped
        ((-3, 6, -2, 9), 1),
    ]:
        got = grower.similarity_window(p, box, step)
        r0, r1, c0, c1 = box
        want = whole[max(r0, 0) : r1 : step, max(c0, 0) : c1 : step]
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 rounding
    # step 1 reads whole rows of the embeddings as they lie: the whole map's own values
    np.testing.assert_array_equal(grower.similarity_window(p, (0, h, 0, w), 1), whole)
    with pytest.raises(ValueError):
        grower.similarity_window(p, (0, h, 0, w), 0)


@pytest.mark.parametrize("reach", [0, 5, 24, 512])
def test_crossing_anchors_near_the_tested_pixels_keep_crossed_worms_whole(monkeypatch, reach):
    """Anchors taken near the tested pixels only (``ANCHOR_REACH``), on a wide image with the
    crossing far from its corner (odd offsets: the box's every second pixel): the crossed
    worms stay whole and the masks equal those of anchors from the whole box."""
    from napari_instseg.core import grow as grow_module

    small = _masks()
    masks = np.zeros((len(small), 131, 517), bool)
    masks[:, 37:101, 333:413] = small
    p = prediction_from_masks(masks, embedding_dim=8, seed=0)
    clicks = [(31 + 37, 10 + 333), (10 + 37, 31 + 333)]
    options = [{}, {"boundary_barrier": 0.5}, {"tau": 0.7}]
    monkeypatch.setattr(grow_module, "ANCHOR_REACH", None)
    whole = [grow(Grower(p), c, **o) for c in clicks for o in options]
    monkeypatch.setattr(grow_module, "ANCHOR_REACH", reach)
    near = [grow(Grower(p), c, **o) for c in clicks for o in options]
    np.testing.assert_array_equal(near[0], masks[0])
    np.testing.assert_array_equal(near[3], masks[1])
    for a, b in zip(near, whole, strict=True):
        np.testing.assert_array_equal(a, b)


def _overlaps_by_brute_force(grower, mask, box, vp, thr, fg_threshold, near, part, radius):
    """``Grower._overlaps`` spelled out pixel by pixel in float64 (the reference)."""
    r0, r1, c0, c1 = box
    t0, t1, u0, u1 = part
    fg = grower.foreground[r0:r1, c0:c1] > fg_threshold
    emb = grower.prediction.embeddings[:, r0:r1, c0:c1].astype(np.float64)
    free = fg & near & ~mask
    tested = [(i, j) for i in range(t0, t1) for j in range(u0, u1) if free[i, j]]
    out = np.zeros((t1 - t0, u1 - u0), bool)
    if not tested:
        return out, np.inf
    rows = [i for i, _ in tested]
    cols = [j for _, j in tested]
    lo_r, hi_r = (0, r1 - r0) if radius is None else (min(rows) - radius, max(rows) + radius)
    lo_c, hi_c = (0, c1 - c0) if radius is None else (min(cols) - radius, max(cols) + radius)
    vp = vp.astype(np.float64)
    anchors = [
        emb[:, i, j]
        for i in range(0, r1 - r0, 2)  # every second row and column of the box
        for j in range(0, c1 - c0, 2)
        if free[i, j]
        and lo_r <= i <= hi_r
        and lo_c <= j <= hi_c
        and ((vp - emb[:, i, j]) ** 2).sum(axis=1).min() > 2 * thr
    ]
    anchors = np.array(anchors).reshape(-1, emb.shape[0])
    closest_margin = np.inf  # how near to ``thr`` a decision came (float32 rounding)
    for i, j in tested:
        e_q = emb[:, i, j]
        seed = vp[((vp - e_q) ** 2).sum(axis=1).argmin()]
        if len(anchors):
            d2 = (((2 * e_q - seed) - anchors) ** 2).sum(axis=1).min()
            out[i - t0, j - u0] = d2 <= thr
            closest_margin = min(closest_margin, abs(d2 - thr))
    return out, closest_margin


@pytest.mark.parametrize("radius", [None, 0, 1, 2, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crossing_anchors_match_a_pixel_by_pixel_reference(radius, seed):
    """The crossing test with random embeddings at every pixel (a one-pixel slip of an
    anchor's row or column changes the answer), on an odd box inside the image, a part of
    it, one or two seed vectors, anchors from the whole box or within ``radius``."""
    from napari_instseg.core.grow import _NearMask

    rng = np.random.default_rng(seed)
    h, w, d = 41, 57, 2
    masks = np.zeros((1, h, w), bool)
    p = prediction_from_masks(masks, embedding_dim=d, seed=seed)
    p.embeddings = rng.normal(0, 1, (d, h, w)).astype(np.float32)
    p.foreground = rng.uniform(0, 1, (h, w)).astype(np.float32)
    grower = Grower(p)
    box = (3, 38, 5, 52)
    r0, r1, c0, c1 = box
    mask = np.zeros((r1 - r0, c1 - c0), bool)
    mask[12:20, 9:30] = True
    near = _NearMask(mask, 4)
    near_full = ndimage.binary_dilation(mask, np.ones((9, 9), bool))  # chessboard radius 4
    thr = 0.3
    n_hits = 0
    for vp_pixels, part in [
        ([(r0 + 15, c0 + 12)], (0, r1 - r0, 0, c1 - c0)),
        ([(r0 + 14, c0 + 11), (r0 + 17, c0 + 25)], (7, 26, 5, 36)),
        ([(r0 + 15, c0 + 12)], (9, 17, 6, 19)),  # anchors lie past the tested pixels
        ([(r0 + 13, c0 + 20), (r0 + 18, c0 + 14)], (11, 24, 14, 31)),
    ]:
        vp = np.stack([p.embeddings[:, r, c] for r, c in vp_pixels])
        got = grower._overlaps(mask, box, vp, thr, 0.3, near, None, part, anchor_radius=radius)
        want, margin = _overlaps_by_brute_force(
            grower, mask, box, vp, thr, 0.3, near_full, part, radius
        )
        assert margin > 1e-4  # no decision within float32 rounding of the threshold
        np.testing.assert_array_equal(got, want)
        n_hits += int(want.sum())
    assert n_hits > 0  # the reference finds crossings: the comparison tests something
