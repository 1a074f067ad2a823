import json

import numpy as np
import pytest

from napari_instseg.core.evaluate import (
    ANCHORS_HEADER,
    evaluate,
    format_table,
    iou_matrix,
    parse_wells,
    to_json,
)
from napari_instseg.core.types import Instances


def _labels(seed, shape=(48, 64), n=6):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        r, c = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 12)
        lab[r : r + rng.integers(4, 10), c : c + rng.integers(5, 12)] = i
    return lab


def test_perfect_prediction_scores_one():
    gts = [Instances.from_labels(_labels(s)).masks for s in range(3)]
    res = evaluate([Instances(m) for m in gts], gts)
    assert res["AP"] == pytest.approx(1.0) and res["AP50"] == pytest.approx(1.0)
    assert all(v == 1.0 for v in res["S"].values()) and res["avS"] == 1.0


def test_one_missing_instance_known_values():
    gt = np.zeros((3, 20, 20), bool)
    gt[0, 0:5, 0:5] = gt[1, 10:15, 0:5] = gt[2, 0:5, 10:20] = True
    res = evaluate([Instances(gt[:2])], [gt])
    # S = TP / (TP + FP + FN) = 2 / 3 at every threshold; AP: recall tops out at 2/3
    assert all(v == pytest.approx(2 / 3) for v in res["S"].values())
    assert res["fn"] == [1] * 5 and res["fp"] == [0] * 5
    assert res["AP"] == pytest.approx(0.663, abs=0.01)  # 101-point interpolation: 67/101


def test_ap_counts_every_prediction_of_an_image_with_more_than_100():
    """An image with over 100 predictions (a large mosaic, a poor model) keeps its AP.

    COCO keeps 100 detections per image; evaluate raises the limit so that none is
    dropped, and pycocotools' summary then reported AP (IoU 0.5:0.95) as -1, shown as 0.
    """
    gt = Instances.from_labels(_labels(0, shape=(96, 128))).masks
    junk = np.zeros((120, 96, 128), bool)
    for k in range(120):  # single pixels in the bottom rows, far from every instance
        junk[k, 95, k] = True
    junk &= ~gt.any(axis=0)
    masks = np.concatenate([gt, junk])
    scores = np.concatenate([np.full(len(gt), 0.9), np.full(len(junk), 0.1)])
    res = evaluate([Instances(masks, scores=scores)], [gt])
    # the true instances rank first: precision 1 at every recall, at every IoU threshold
    assert res["AP"] == pytest.approx(1.0)
    assert res["AP50"] == pytest.approx(1.0) and res["AP75"] == pytest.approx(1.0)
    # ranked last-but-one, one true instance costs precision beyond its recall
    scores[0] = 0.05
    res = evaluate([Instances(masks, scores=scores)], [gt])
    assert 0.5 < res["AP"] < 1.0
    assert res["AP"] == pytest.approx(res["AP50"]) == pytest.approx(res["AP75"])


def test_overlapping_masks_and_scores_rank():
    gt = np.zeros((2, 20, 20), bool)
    gt[0, 8:12, :] = True
    gt[1, :, 8:12] = True  # crossing: shares 16 pixels
    wrong = np.zeros((1, 20, 20), bool)
    wrong[0, 0:3, 0:3] = True
    pred = Instances(np.concatenate([gt, wrong]), scores=np.array([0.9, 0.8, 0.1]))
    res = evaluate([pred], [gt])
    assert res["AP"] == pytest.approx(1.0)  # the false positive ranks last
    assert res["S"]["0.5"] == pytest.approx(2 / 3)
    ranked_first = Instances(pred.masks, scores=np.array([0.5, 0.4, 0.9]))
    assert evaluate([ranked_first], [gt])["AP"] < 0.9


def test_dsb_matches_stardist():
    matching = pytest.importorskip("stardist.matching")
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for s in range(4):
        gt = _labels(s)
        pred = np.roll(gt, rng.integers(-2, 3), axis=1)  # shifted copies: IoUs spread out
        pred[pred == 3] = 0  # one missed instance
        preds.append(pred)
        gts.append(gt)
    res = evaluate(preds, gts)
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        ref = np.mean(
            [matching.matching(g, p, thresh=t).accuracy for g, p in zip(gts, preds, strict=True)]
        )
        assert res["S"][f"{t:g}"] == pytest.approx(ref)


def test_dsb_matching_is_one_to_one_where_ground_truth_overlaps():
    """One predicted worm over two heavily overlapping annotated ones matches one of them:
    TP 1, FP 0, FN 1 at every threshold (the IoUs are 1.0 and 0.9), S = 1 / 2. Counting
    every ground-truth mask some prediction reaches would give TP 2 (and FP -1)."""
    gt = np.zeros((2, 20, 20), bool)
    gt[0, 0:10, 0:10] = True
    gt[1, 0:10, 1:10] = True  # IoU 0.9 with the first
    res = evaluate([Instances(gt[:1].copy())], [gt])
    assert res["tp"] == [1] * 5 and res["fp"] == [0] * 5 and res["fn"] == [1] * 5
    assert all(v == pytest.approx(0.5) for v in res["S"].values())
    # two predictions, one per annotated worm: both match
    assert evaluate([Instances(gt.copy())], [gt])["tp"] == [2] * 5


def test_iou_matrix_and_errors():
    a = np.zeros((1, 4, 4), bool)
    a[0, :2] = True
    b = np.zeros((2, 4, 4), bool)
    b[0, :1] = True
    b[1, 2:] = True
    np.testing.assert_allclose(iou_matrix(a, b), [[0.5, 0.0]])
    with pytest.raises(ValueError, match="ground-truth images"):
        evaluate([a], [b, b])
    with pytest.raises(ValueError, match="predicted masks are"):
        evaluate([np.zeros((1, 5, 5), bool)], [b])
    # also when one side has no instances: its (0, H, W) still says its size
    with pytest.raises(ValueError, match="predicted masks are"):
        evaluate([np.zeros((0, 5, 5), bool)], [b])
    with pytest.raises(ValueError, match="predicted masks are"):
        evaluate([Instances(np.zeros((0, 5, 5), bool))], [np.zeros((0, 4, 4), bool)])
    for thresholds in ([0.5, 1.5], [0.0], [-0.2], []):
        with pytest.raises(ValueError, match=r"IoU thresholds must be in \(0, 1\]"):
            evaluate([a], [b], thresholds=thresholds)
    assert evaluate([a], [b], thresholds=[1.0])["S"]["1"] == 0.0


def test_empty_images_and_table_json():
    empty = np.zeros((0, 8, 8), bool)
    res = evaluate([Instances(empty)], [empty])
    assert res["S"]["0.5"] == 1.0 and np.isnan(res["AP"])
    gt = np.ones((1, 8, 8), bool)
    res = evaluate([Instances(empty)], [gt])
    assert res["AP"] == 0.0 and res["avS"] == 0.0
    table = format_table({"mine": res})
    assert "mine" in table and "PatchPerPix" in table and "0.569" in table
    # the published numbers come after a header that says what they are
    lines = table.splitlines()
    header = lines.index(ANCHORS_HEADER)
    assert "BBBC010 test half" in ANCHORS_HEADER and "not comparable" in ANCHORS_HEADER
    assert lines[header - 1].startswith("mine") and lines[header + 1].startswith("Novotny")
    assert json.loads(to_json(res))["n_gt"] == 1


def test_parse_wells():
    assert parse_wells("B13-C02") == [
        "B13",
        "B14",
        "B15",
        "B16",
        "B17",
        "B18",
        "B19",
        "B20",
        "B21",
        "B22",
        "B23",
        "B24",
        "C01",
        "C02",
    ]
    assert parse_wells("a01, A03-A04,A03") == ["A01", "A03", "A04"]
    assert len(parse_wells("A01-C02")) == 50
    for bad in ("A25", "Z1x", "B02-A01", ""):
        with pytest.raises(ValueError):
            parse_wells(bad)


def test_cli_evaluate_bbbc010_needs_model_or_pred(bbbc010_root, tmp_path, capsys):
    from napari_instseg.cli import main

    # the ground truth against itself through a training folder is not needed: compare a
    # BBBC010 folder with itself (perfect), on two wells
    out = tmp_path / "r.json"
    rc = main(
        [
            "evaluate",
            "--gt",
            str(bbbc010_root),
            "--pred",
            str(bbbc010_root),
            "--wells",
            "A01-A02",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 2 and res["avS"] == 1.0 and res["AP"] == pytest.approx(1.0)
    assert "PatchPerPix" in capsys.readouterr().out


def test_cli_evaluate_shows_the_published_anchors_beside_bbbc010_only(tmp_path, capsys):
    from napari_instseg.cli import main
    from napari_instseg.core.synthetic import make_worms
    from napari_instseg.core.training_folder import write_training_folder

    sample = make_worms(shape=(96, 112), n_worms=3, n_crossings=1, n_touching=0, seed=1)
    sample.name = "plate"
    write_training_folder(tmp_path / "mine", [sample])
    args = ["evaluate", "--gt", str(tmp_path / "mine"), "--pred", str(tmp_path / "mine")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ours" in out and "PatchPerPix" not in out and ANCHORS_HEADER not in out
    # a folder for --json is refused before anything is computed
    assert main([*args, "--json", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_cli_evaluate_wells_names_training_folder_images(tmp_path, capsys):
    """--wells takes a training folder's image names, dashes included, as well as wells."""
    from napari_instseg.cli import main
    from napari_instseg.core.evaluate import parse_names
    from napari_instseg.core.synthetic import make_worms
    from napari_instseg.core.training_folder import write_training_folder

    assert parse_names("A01-A03,synthetic-5, img7") == ["A01", "A02", "A03", "synthetic-5", "img7"]
    samples = [
        make_worms(shape=(96, 112), n_worms=2 + i, n_crossings=0, n_touching=0, seed=i)
        for i in range(3)
    ]
    for i, sample in enumerate(samples):
        sample.name = f"synthetic-{i}"
    write_training_folder(tmp_path / "mine", samples)
    args = ["evaluate", "--gt", str(tmp_path / "mine"), "--pred", str(tmp_path / "mine")]
    json_path = tmp_path / "out.json"
    assert main([*args, "--wells", "synthetic-0,synthetic-2", "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "2 images, 6 ground-truth instances" in out  # 2 + 4 worms
    assert main([*args, "--wells", "synthetic-9"]) == 1
    err = capsys.readouterr().err
    assert "no ground-truth images named by --wells synthetic-9 found in" in err


def _synthetic_folder(folder, prefix, seeds, shape, touching):
    """Synthetic worm images (4 worms, one crossing) written as a training folder."""
    from napari_instseg.core.synthetic import make_worms
    from napari_instseg.core.training_folder import write_training_folder

    samples = [
        make_worms(shape=shape, n_worms=4, n_crossings=1, n_touching=touching, seed=s)
        for s in seeds
    ]
    for i, sample in enumerate(samples):
        sample.name = f"{prefix}-{i}"
    write_training_folder(folder, samples)
    return samples


def test_cli_evaluate_with_a_model_predicts_and_scores_as_the_api_does(tmp_path, capsys):
    """``evaluate --model``: predict, segment and score in one go, the API's numbers."""
    from napari_instseg import load_model, predict, segment
    from napari_instseg.cli import main

    samples = _synthetic_folder(tmp_path / "mine", "plate", (1, 2), (192, 256), touching=0)
    out = tmp_path / "r.json"
    argv = ["evaluate", "--gt", str(tmp_path / "mine"), "--model", "default", "--tta", "1"]
    assert main([*argv, "--device", "cpu", "--method", "auto", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plate-0:" in printed and "plate-1:" in printed  # one line per image predicted
    res = json.loads(out.read_text())
    model = load_model()
    found = [segment(predict(s.image, model, "cpu", tta=1), method="auto") for s in samples]
    expected = evaluate(found, [s.masks for s in samples])
    assert res["n_images"] == 2 and res["n_pred"] == expected["n_pred"] > 0
    for key in ("AP", "AP50", "avS"):
        assert res[key] == pytest.approx(expected[key])
    # weights that are not there: one clear line, status 1
    assert main([*argv, "--model", str(tmp_path / "none.safetensors")]) == 1
    assert "none.safetensors" in capsys.readouterr().err


def test_cli_evaluate_tune_write_stores_what_segment_auto_then_uses(tmp_path, capsys):
    """``evaluate --model M --tune --write``: parameters chosen on the images are written
    into M, and the scores printed are those of ``segment(method="auto")`` with M after."""
    import shutil

    from napari_instseg import load_model, predict, segment
    from napari_instseg.cli import main
    from napari_instseg.core.weights import shipped_weights_path

    shipped = shipped_weights_path()
    mine = tmp_path / "mine.safetensors"
    shutil.copy(shipped, mine)
    meta = json.loads(shipped.with_suffix(".json").read_text())
    for key in ("segment_params", "recommended_method", "recommended_tta"):
        meta.pop(key, None)  # as `train` leaves a model: untuned
    mine.with_suffix(".json").write_text(json.dumps(meta))
    assert "segment_params" not in load_model(mine).metadata
    samples = _synthetic_folder(tmp_path / "val", "val", (3, 4), (160, 224), touching=1)
    out = tmp_path / "r.json"
    argv = ["evaluate", "--gt", str(tmp_path / "val"), "--model", str(mine), "--tta", "1"]
    argv += ["--device", "cpu", "--tune", "--write", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tuning boundary on 2 images" in printed and "wrote the parameters" in printed
    assert "on the images it was tuned on" in printed
    tuned = load_model(mine)
    assert tuned.metadata["recommended_method"] == "boundary"
    assert tuned.metadata["recommended_tta"] == 1
    assert set(tuned.metadata["segment_params"]["boundary"]) >= {"boundary_threshold", "min_size"}
    found = [segment(predict(s.image, tuned, "cpu", tta=1), method="auto") for s in samples]
    expected = evaluate(found, [s.masks for s in samples])
    res = json.loads(out.read_text())
    for key in ("AP", "AP50", "avS"):
        assert res[key] == pytest.approx(expected[key])
    assert tuned.metadata["metrics"]["boundary"]["AP"] == pytest.approx(expected["AP"])


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (["--pred", "p", "--tune"], "--tune needs --model"),
        (["--model", "m.safetensors", "--write"], "give --tune as well"),
        (["--model", "default", "--tune", "--write"], "would change the shipped weights"),
        (["--model", "default", "--cross-validate", "2"], "give --tune as well"),
        (["--model", "default", "--tune", "--cross-validate", "1"], "2 folds or more"),
    ],
)
def test_cli_evaluate_tune_and_write_refuse_what_they_cannot_do(tmp_path, capsys, extra, error):
    from napari_instseg.cli import main

    assert main(["evaluate", "--gt", str(tmp_path), *extra]) == 1
    assert error in capsys.readouterr().err


def test_cli_evaluate_cross_validate_scores_the_search_on_held_out_folds(
    tmp_path, capsys, monkeypatch
):
    """``--tune --cross-validate 2``: beside the in-sample scores, each image segmented with
    the parameters tuned on the other fold, as ``cross_validate_tuning`` gives them."""
    import napari_instseg.core.tune as tune
    from napari_instseg import load_model, predict
    from napari_instseg.cli import main
    from napari_instseg.core.tune import cross_validate_tuning

    # a small search keeps the test short; the folds and their scoring are what is tested
    small = {"boundary": {"boundary_threshold": [0.5, 0.9], "min_size": [30, 300]}}
    monkeypatch.setattr(tune, "DEFAULT_GRIDS", small)

    samples = _synthetic_folder(tmp_path / "val", "val", (5, 6, 7), (160, 224), touching=1)
    out = tmp_path / "r.json"
    argv = ["evaluate", "--gt", str(tmp_path / "val"), "--model", "default", "--tta", "1"]
    argv += ["--device", "cpu", "--tune", "--cross-validate", "2", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tuned on these images" in printed and "2-fold cross-validated" in printed
    res = json.loads(out.read_text())
    cv = res["cross_validated"]
    assert cv["folds"] == [["val-0", "val-2"], ["val-1"]] and len(cv["fold_params"]) == 2
    model = load_model()
    preds = [predict(s.image, model, "cpu", tta=1) for s in samples]
    expected = cross_validate_tuning(
        preds,
        [s.masks for s in samples],
        method="boundary",
        starts=[model.metadata["segment_params"]],
    )
    for key in ("AP", "avS"):
        assert cv[key] == pytest.approx(expected.scores[key])
    # more folds than images: one clear line
    argv[-3] = "4"  # --cross-validate 4
    assert main(argv) == 1
    assert "more folds than the 3 images" in capsys.readouterr().err
