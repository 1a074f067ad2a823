"""Per-model tuning of the segmentation parameters."""

import numpy as np
import pytest

from napari_instseg.core.instances import segment
from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.predict import resolve_tta
from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.tune import tune_segmentation, write_tuning
from napari_instseg.core.weights import load_model, save_model


def _soft(seed):
    """Oracle maps made blurry: the default boundary threshold 0.5 is a poor choice."""
    s = make_worms((128, 128), n_worms=4, n_touching=2, n_crossings=0, seed=seed)
    p = prediction_from_masks(s.masks)
    p.boundary = np.clip(0.75 + 0.25 * p.boundary, 0, 1).astype(np.float32)
    return p, s.masks


def test_tuning_finds_better_parameters_than_the_defaults(tmp_path):
    data = [_soft(i) for i in range(2)]
    preds, gts = [d[0] for d in data], [d[1] for d in data]
    calls = []
    result = tune_segmentation(
        preds,
        gts,
        methods=["boundary"],
        grids={"boundary": {"boundary_threshold": [0.5, 0.9], "dilate_iterations": [1, 0]}},
        progress=lambda m, p, s: calls.append(s),
    )
    assert result.method == "boundary" and result.trials == len(calls) >= 3
    assert result.params["boundary"]["boundary_threshold"] == 0.9
    default_ap = calls[0]
    assert result.scores["boundary"]["AP"] > default_ap
    # stored in the weights and used by segment(method="auto") through predict's metadata
    model = InstSegNet(ModelConfig(channels=(8, 8), embedding_dim=4))
    path = save_model(model, tmp_path / "m.safetensors", {"name": "m"})
    write_tuning(path, result, images="synthetic", tta=4)
    tuned_model = load_model(path)
    meta = tuned_model.metadata
    assert meta["recommended_method"] == "boundary"
    assert meta["recommended_tta"] == 4 and resolve_tta(tuned_model, "auto") == 4
    assert resolve_tta(model, "auto") == 1 and resolve_tta(tuned_model, 2) == 2
    assert meta["segment_params"]["boundary"]["boundary_threshold"] == 0.9
    assert meta["metrics"]["validation_wells"] == "synthetic"
    preds[0].metadata.update(recommended_method="boundary", segment_params=meta["segment_params"])
    auto = segment(preds[0], "auto")
    tuned = segment(preds[0], "boundary", **meta["segment_params"]["boundary"])
    assert len(auto) == len(tuned) and all(
        np.array_equal(a, b) for a, b in zip(auto.masks, tuned.masks, strict=True)
    )
    # tuning one method later keeps the others' parameters; the best stored AP is recommended
    seeds_only = tune_segmentation(
        preds, gts, methods=["seeds"], grids={"seeds": {"min_score": [0.0, 0.5]}}
    )
    write_tuning(path, seeds_only, images="synthetic")
    meta = load_model(path).metadata
    assert meta["recommended_tta"] == 1  # the passes of the latest tuning's predictions
    assert set(meta["segment_params"]) == {"boundary", "seeds"}
    assert meta["segment_params"]["boundary"]["boundary_threshold"] == 0.9
    best = max(("boundary", "seeds"), key=lambda m: meta["metrics"][m]["AP"])
    assert meta["recommended_method"] == best


def test_tuning_errors():
    p, m = _soft(0)
    with pytest.raises(ValueError, match="as many"):
        tune_segmentation([p], [])
    with pytest.raises(ValueError, match="grid"):
        tune_segmentation([p], [m], methods=["magic"])


def _scores(table):
    """A fake evaluation: the score of each (a, b) from a table, 0 elsewhere."""
    return lambda found, gt: {"AP": table.get((found[0]["a"], found[0]["b"]), 0.0)}


def test_tuning_escapes_a_local_optimum_from_several_starts(monkeypatch):
    import napari_instseg.core.tune as tune

    monkeypatch.setattr(tune, "segment", lambda prediction, method, **params: params)
    grid = {"boundary": {"a": [0, 1, 2], "b": [0, 1, 2]}}
    # (0, 0), the grid's first values, beats all its neighbours: a trap for one search;
    # from the middle values (1, 1) the search climbs to (2, 1) and then (2, 2)
    monkeypatch.setattr(
        tune, "evaluate", _scores({(0, 0): 0.5, (1, 1): 0.2, (2, 1): 0.3, (2, 2): 1.0})
    )
    result = tune.tune_segmentation(["p"], ["gt"], methods=["boundary"], grids=grid)
    assert result.params["boundary"] == {"a": 2, "b": 2}
    assert result.scores["boundary"]["AP"] == 1.0
    # now the middle is a trap too: only a given start, (0, 2), leads to (2, 2)
    monkeypatch.setattr(tune, "evaluate", _scores({(0, 0): 0.5, (0, 2): 0.2, (2, 2): 1.0}))
    trapped = tune.tune_segmentation(["p"], ["gt"], methods=["boundary"], grids=grid)
    assert trapped.params["boundary"] == {"a": 0, "b": 0}
    calls = []
    result = tune.tune_segmentation(
        ["p"],
        ["gt"],
        methods=["boundary"],
        grids=grid,
        starts=[{"boundary": {"b": 2, "unknown": 7}}, {"seeds": {"a": 1}}],
        progress=lambda method, params, score: calls.append(params),
    )
    assert calls[0] == {"a": 0, "b": 0}  # the first values are searched first
    assert {"a": 0, "b": 2} in calls  # the given start: unknown names dropped, missing = first
    assert result.params["boundary"] == {"a": 2, "b": 2}


def test_cross_validation_tunes_each_fold_on_the_other_images(monkeypatch):
    import napari_instseg.core.tune as tune

    data = [_soft(i) for i in range(5)]
    preds, gts = [d[0] for d in data], [d[1] for d in data]
    grid = {"boundary": {"boundary_threshold": [0.5, 0.9], "dilate_iterations": [1, 0]}}
    seen = []
    real = tune.tune_segmentation

    def spy(predictions, ground_truth, **kwargs):
        seen.append([next(i for i, p in enumerate(preds) if p is q) for q in predictions])
        return real(predictions, ground_truth, **kwargs)

    monkeypatch.setattr(tune, "tune_segmentation", spy)
    cv = tune.cross_validate_tuning(
        preds, gts, n_folds=2, grids=grid, names=[f"im{i}" for i in range(5)]
    )
    assert cv.folds == [[0, 2, 4], [1, 3]]
    # each fold's parameters come from the other fold's images only
    assert seen == [[1, 3], [0, 2, 4]]
    assert len(cv.params) == 2 and all(p["boundary_threshold"] == 0.9 for p in cv.params)
    assert cv.scores["n_images"] == 5 and list(cv.scores["per_image"]) == [
        f"im{i}" for i in range(5)
    ]
    assert cv.trials >= 6
    # every image is scored with its own fold's parameters (here the same in both folds)
    from napari_instseg.core.evaluate import evaluate

    found = [segment(p, "boundary", **cv.params[i % 2]) for i, p in enumerate(preds)]
    assert cv.scores["AP"] == pytest.approx(evaluate(found, gts)["AP"])


def test_cross_validation_errors():
    p, m = _soft(0)
    from napari_instseg.core.tune import cross_validate_tuning

    with pytest.raises(ValueError, match="n_folds"):
        cross_validate_tuning([p, p], [m, m], n_folds=3)
    with pytest.raises(ValueError, match="n_folds"):
        cross_validate_tuning([p, p], [m, m], n_folds=1)
    with pytest.raises(ValueError, match="as many"):
        cross_validate_tuning([p, p], [m])


def test_grid_candidates_may_be_json_lists(monkeypatch):
    import napari_instseg.core.tune as tune

    monkeypatch.setattr(tune, "segment", lambda prediction, method, **params: params)
    monkeypatch.setattr(
        tune, "evaluate", lambda found, gt: {"AP": 1.0 if found[0]["pair"] == (3, 4) else 0.5}
    )
    # pairs read back from JSON metadata are lists, e.g. a model's stored edge_thresholds
    grid = {"boundary": {"pair": [[1, 2], [3, 4]], "single": [[0.88, 0.98]]}}
    result = tune.tune_segmentation(["p"], ["gt"], methods=["boundary"], grids=grid)
    assert result.params["boundary"] == {"pair": (3, 4), "single": (0.88, 0.98)}
