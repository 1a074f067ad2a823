"""Choose the segmentation method and its parameters for a model on validation images.

A model's maps differ from one training run to the next (how sharp its boundaries are,
how confident its seediness is), so the parameters of :func:`~.instances.segment` are
tuned per model on validation images and stored in the weights' metadata
(``recommended_method``, ``segment_params``); ``segment(prediction, "auto")`` then uses them.

The search is coordinate-wise: each parameter in turn tries its candidate values while the
others stay at their best so far, for ``passes`` rounds. It is cheap (tens of evaluations
per method) and deterministic. One coordinate search can stop in a local optimum far from
the best (a second v10 training run, searched from the grid's first values only, ended at
``min_size`` 30 and AP 0.576 on its 18 validation images; from three starts: 0.627), so it
runs from several starting points (the grid's first values, its middle values and any
given, e.g. the parameters a model already has) and keeps the best end point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .evaluate import evaluate
from .instances import segment
from .types import Prediction

#: Candidate values per method and parameter (the first value of each list starts the search).
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "boundary": {
        "boundary_threshold": [0.5, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95],
        "marker_threshold": [0.5, 1.0, 1.5, 2.0],
        "dilate_iterations": [0, 1, 2],
        "fg_threshold": [0.5, 0.4, 0.3, 0.2, 0.1],  # v6 chose 0.3, the lowest of [0.5, 0.4, 0.3]
        "min_size": [30, 200, 300, 400, 500],  # BBBC010 worms: 10th percentile ~830 px
        "split_factor": [0.0, 1.3, 1.6, 2.0],
        "split_tau": [0.2, 0.3, 0.5],
        "merge_tau": [0.3, 0.0, 0.2, 0.5],
        # (curved, straight) contrast thresholds of core/edges.py; None: no refinement
        "edge_thresholds": [None, (0.88, 0.98), (0.9, 0.98), (0.88, 0.985), (0.92, 0.97)],
        # (max_elongation, min_solidity) of instances dropped as debris; None: keep all
        "blob_filter": [None, (2.5, 0.8)],
    },
    "seeds": {
        "min_seediness": [0.0, 0.1, 0.3, 0.5],
        "min_score": [0.0, 0.2, 0.5],
        "alpha": [0.3, 1.0],
    },
    "hybrid": {
        "boundary_threshold": [0.5, 0.7, 0.85, 0.92],
        "marker_threshold": [0.5, 1.0, 1.5],
        "dilate_iterations": [0, 1],
        "fg_threshold": [0.5, 0.4, 0.3],
        "boundary_barrier": [0.5, 0.8, 0.92],
        "min_seediness": [0.0, 0.3, 0.5],
        "min_score": [0.0, 0.3, 0.5],
        # which source leads: the grown masks or the boundary pipeline's segments
        "primary": ["seeds", "boundary"],
    },
}


@dataclass
class TuneResult:
    """Outcome of :func:`tune_segmentation`.

    Attributes
    ----------
    method : str
        Best method by ``metric``.
    params : dict
        Best parameters per method.
    scores : dict
        Full evaluation (:func:`~.evaluate.evaluate`) at the best parameters, per method.
    metric : str
        What was maximised.
    trials : int
        Evaluations run.
    """

    method: str
    params: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, Any]]
    metric: str = "AP"
    trials: int = 0
    history: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)


def tune_segmentation(
    predictions: Sequence[Prediction],
    ground_truth: Sequence[Any],
    methods: Sequence[str] = ("boundary", "seeds", "hybrid"),
    grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    metric: str = "AP",
    passes: int = 2,
    progress: Callable[[str, dict[str, Any], float], None] | None = None,
    starts: Sequence[Mapping[str, Mapping[str, Any]]] = (),
) -> TuneResult:
    """Coordinate-wise search of each method's parameters on validation images.

    Parameters
    ----------
    predictions : sequence of Prediction
        Model outputs on the validation images.
    ground_truth : sequence
        Per image, what :func:`~.evaluate.evaluate` accepts (e.g. (N, H, W) masks).
    methods : sequence of str
        Methods to tune.
    grids : mapping, optional
        ``{method: {param: [candidates]}}``; default :data:`DEFAULT_GRIDS`.
    metric : str
        Key of the evaluation to maximise (``AP``, ``AP50``, ``avS``).
    passes : int
        Rounds over all parameters.
    progress : callable, optional
        Called with (method, params, score) after every evaluation.
    starts : sequence of mapping
        More starting points, each ``{method: {param: value}}`` (e.g. a model's stored
        ``segment_params``); parameters outside the grid are ignored, missing ones take the
        grid's first value. The search always also starts from the grid's first and middle
        values, and the result is at least as good as every starting point.

    Returns
    -------
    TuneResult
        Best method and parameters.
    """
    if len(predictions) != len(ground_truth) or not predictions:
        raise ValueError("need as many ground-truth entries as predictions (at least one)")
    grids = grids or DEFAULT_GRIDS
    unknown = [m for m in methods if m not in grids]
    if unknown:
        raise ValueError(f"no parameter grid for method(s) {unknown}")
    result = TuneResult(method="", params={}, scores={}, metric=metric)
    seen: dict[tuple, tuple[float, dict[str, Any]]] = {}

    def score(method: str, params: dict[str, Any]) -> float:
        key = _key(method, params)
        if key not in seen:
            found = [segment(p, method, **params) for p in predictions]
            full = evaluate(found, list(ground_truth))
            full.pop("per_image", None)
            seen[key] = (float(full[metric]), full)
            result.trials += 1
            result.history.append((method, dict(params), seen[key][0]))
            if progress is not None:
                progress(method, dict(params), seen[key][0])
        return seen[key][0]

    def search(method: str, start: dict[str, Any]) -> tuple[dict[str, Any], float]:
        best, best_score = start, score(method, start)
        for _ in range(passes):
            changed = False
            for name, values in grids[method].items():
                for value in values:
                    trial = {**best, name: _hashable(value)}
                    s = score(method, trial)
                    if s > best_score + 1e-9:
                        best, best_score, changed = trial, s, True
            if not changed:
                break
        return best, best_score

    for method in methods:
        grid = grids[method]
        # candidates may come as JSON lists (pairs): tuples keep the points hashable
        first = {name: _hashable(values[0]) for name, values in grid.items()}
        middle = {name: _hashable(values[len(values) // 2]) for name, values in grid.items()}
        points = [first, middle]
        for start in starts:
            given = start.get(method) or {}
            # JSON metadata stores pairs as lists: tuples keep the points hashable
            points.append({name: _hashable(given.get(name, first[name])) for name in grid})
        best, best_score = None, float("-inf")
        for point in dict.fromkeys(tuple(p.items()) for p in points):  # unique, in order
            found, found_score = search(method, dict(point))
            if found_score > best_score + 1e-9:
                best, best_score = found, found_score
        result.params[method] = best
        result.scores[method] = seen[_key(method, best)][1]
    result.method = max(methods, key=lambda m: result.scores[m][metric])
    return result


@dataclass
class CrossValidation:
    """Outcome of :func:`cross_validate_tuning`.

    Attributes
    ----------
    folds : list of list of int
        Indices of the images in each fold.
    params : list of dict
        Per fold, the method's parameters tuned on the other folds' images.
    scores : dict
        :func:`~.evaluate.evaluate` of every image segmented with its out-of-fold
        parameters (``per_image`` included, in the input order).
    method : str
        The method tuned.
    trials : int
        Evaluations run, all folds together.
    """

    folds: list[list[int]]
    params: list[dict[str, Any]]
    scores: dict[str, Any]
    method: str = "boundary"
    trials: int = 0


def cross_validate_tuning(
    predictions: Sequence[Prediction],
    ground_truth: Sequence[Any],
    n_folds: int = 2,
    method: str = "boundary",
    grids: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    metric: str = "AP",
    starts: Sequence[Mapping[str, Mapping[str, Any]]] = (),
    names: Sequence[str] | None = None,
) -> CrossValidation:
    """Score the parameter search itself: tune on some images, measure on the others.

    Tuning on the images a score is reported on makes the score optimistic. Here the
    images are split into ``n_folds`` interleaved folds (image ``i`` goes to fold
    ``i % n_folds``); each fold is segmented with the parameters
    :func:`tune_segmentation` finds on the other folds, and all images are then scored
    together. That is how published BBBC010 results that choose their parameters by
    cross-validation on the evaluated images are made comparable.

    Parameters
    ----------
    predictions, ground_truth : sequence
        As for :func:`tune_segmentation`.
    n_folds : int
        At least 2 and at most the number of images.
    method : str
        The method to tune and score.
    grids, metric, starts
        Passed to :func:`tune_segmentation`.
    names : sequence of str, optional
        Image names for the scores' ``per_image``.

    Returns
    -------
    CrossValidation
        Folds, per-fold parameters and the out-of-fold scores.
    """
    n = len(predictions)
    if len(ground_truth) != n:
        raise ValueError("need as many ground-truth entries as predictions")
    if not 2 <= n_folds <= n:
        raise ValueError(
            f"n_folds must be between 2 and the number of images ({n}), got {n_folds}"
        )
    folds = [list(range(k, n, n_folds)) for k in range(n_folds)]
    found: list[Any] = [None] * n
    params: list[dict[str, Any]] = []
    trials = 0
    for fold in folds:
        held_out = set(fold)
        rest = [i for i in range(n) if i not in held_out]
        tuned = tune_segmentation(
            [predictions[i] for i in rest],
            [ground_truth[i] for i in rest],
            methods=[method],
            grids=grids,
            metric=metric,
            starts=starts,
        )
        trials += tuned.trials
        params.append(tuned.params[method])
        for i in fold:
            found[i] = segment(predictions[i], method, **tuned.params[method])
    scores = evaluate(found, list(ground_truth), names=list(names) if names else None)
    return CrossValidation(folds=folds, params=params, scores=scores, method=method, trials=trials)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _key(method: str, params: Mapping[str, Any]) -> tuple:
    return method, tuple(sorted((k, _hashable(v)) for k, v in params.items()))


def write_tuning(
    weights: str | Path,
    result: TuneResult,
    images: str,
    description: str | None = None,
    tta: int = 1,
) -> Path:
    """Store a tuning result in a weights file's metadata (``segment(..., "auto")`` uses it).

    Methods in ``result`` replace their stored parameters and metrics; methods tuned
    before and not now keep theirs. The recommended method is the one with the highest
    stored COCO AP.

    Parameters
    ----------
    weights : path
        ``.safetensors`` file (rewritten atomically with its JSON).
    result : TuneResult
        From :func:`tune_segmentation`.
    images : str
        Which images it was tuned on (e.g. ``"B13-C02"``), recorded in the metrics.
    description : str, optional
        Replaces the model's description.
    tta : int
        Test-time augmentation passes of the predictions it was tuned on, stored as
        ``recommended_tta`` (``predict(..., tta="auto")`` and the CLI and widget use it).

    Returns
    -------
    Path
        The weights path.
    """
    from .weights import load_model, save_model

    model = load_model(weights)
    meta = dict(model.metadata)
    # methods tuned now replace their old entries; the others keep theirs
    meta["segment_params"] = {**(meta.get("segment_params") or {}), **result.params}
    metrics = dict(meta.get("metrics") or {})
    metrics["validation_wells"] = images
    for method, full in result.scores.items():
        metrics[method] = {k: full[k] for k in ("AP", "AP50", "AP75", "avS", "S") if k in full}
    meta["metrics"] = metrics
    candidates = [
        m
        for m in meta["segment_params"]
        if isinstance(metrics.get(m), dict) and "AP" in metrics[m]
    ]
    meta["recommended_method"] = max(
        candidates or [result.method], key=lambda m: metrics.get(m, {}).get("AP", -1.0)
    )
    meta["recommended_tta"] = int(tta)
    if description:
        meta["description"] = description
    return save_model(model, weights, meta)
