"""The accuracy scripts on BBBC010: ``eval_bbbc010.py`` and ``cv_bbbc010.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def cv_script(load_benchmark):
    return load_benchmark("cv_bbbc010")


def test_eval_script_writes_scores_per_image(load_benchmark, bbbc010_root, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["--data", str(bbbc010_root), "--wells", "B13,B14", "--methods", "boundary"]
    argv += ["--cache", str(tmp_path / "cache"), "--json", str(out)]
    assert load_benchmark("eval_bbbc010").main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["per_image"]["boundary"]
    assert set(rows) == {"B13", "B14"} and all(len(r) == 5 for r in rows.values())
    mean_s05 = np.mean([r[0] for r in rows.values()])
    assert report["results"]["boundary"]["S"]["0.5"] == pytest.approx(mean_s05)


def test_intervals_hold_the_mean_and_widen_with_the_spread(cv_script):
    rng = np.random.default_rng(0)
    narrow = {f"i{k}": list(0.8 + 0.01 * rng.standard_normal(5)) for k in range(18)}
    wide = {f"i{k}": list(0.8 + 0.2 * rng.standard_normal(5)) for k in range(18)}
    ci_narrow = cv_script.per_image_intervals(narrow, n_resamples=500)
    ci_wide = cv_script.per_image_intervals(wide, n_resamples=500)
    for ci, rows in ((ci_narrow, narrow), (ci_wide, wide)):
        arr = np.array(list(rows.values()))
        lo, hi = ci["avS"]
        assert lo <= arr.mean() <= hi
        lo, hi = ci["S0.5"]
        assert lo <= arr[:, 0].mean() <= hi
    width = {k: ci_wide[k][1] - ci_wide[k][0] for k in ci_wide}
    assert all(width[k] > 5 * (ci_narrow[k][1] - ci_narrow[k][0]) for k in width)


def test_script_reports_in_sample_and_out_of_fold(cv_script, bbbc010_root, tmp_path, capsys):
    out = tmp_path / "cv.json"
    argv = ["--data", str(bbbc010_root), "--wells", "B13,B14", "--tta", "1"]
    argv += ["--cache", str(tmp_path / "cache"), "--bootstrap", "200", "--json", str(out)]
    argv += ["--grid", json.dumps({"boundary_threshold": [0.5, 0.95], "min_size": [30, 500]})]
    assert cv_script.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["folds"] == [["B13"], ["B14"]]
    assert len(report["fold_params"]) == 2
    # only the given grid is searched; the other parameters keep the shipped model's values
    from napari_instseg.core.weights import load_model

    stored = load_model().metadata["segment_params"]["boundary"]
    for params in report["fold_params"]:
        assert set(params) == set(stored) and params["min_size"] in (30, 500)
        assert params["edge_thresholds"] == stored["edge_thresholds"]
    rows = report["results"]
    assert set(rows) == {"stored parameters (in-sample)", "2-fold out-of-fold"}
    for row in rows.values():
        assert set(row["per_image"]) == {"B13", "B14"} and 0 <= row["avS"] <= 1
    assert "95 % interval over images" in capsys.readouterr().out
