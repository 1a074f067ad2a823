"""How optimistic is a score whose parameters were tuned on the images it is reported on?

The shipped model's segmentation parameters were chosen on the same 18 held-out images its
validation scores are reported on. This script reports, beside those in-sample scores, the
scores of a k-fold cross-validated search (:func:`napari_instseg.core.tune.cross_validate_tuning`:
each fold segmented with parameters tuned on the other folds; PatchPerPix chose its
BBBC010 parameters by 2-fold cross-validation on its evaluated images), and a 95 %
bootstrap interval over images for avS and S0.5 (:func:`scipy.stats.bootstrap`), to tell
a real difference from the spread of 18 images.

    python benchmarks/cv_bbbc010.py --wells A11-A12,B11-B12,C01-C02,B13-B24 --tta 8

Only the training half of BBBC010 is here; use validation wells, never the held-back test half.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_instseg.core.evaluate import evaluate, format_table  # noqa: E402
from napari_instseg.core.instances import segment  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.tune import cross_validate_tuning  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402


def per_image_intervals(
    per_image: dict[str, list[float]], n_resamples: int = 2000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % percentile-bootstrap intervals of the mean avS and S0.5 over images.

    Parameters
    ----------
    per_image : dict
        Image name -> DSB accuracy per IoU threshold (0.5 first), as ``evaluate`` gives.
    n_resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict
        ``{"avS": (low, high), "S0.5": (low, high)}``.
    """
    rows = np.asarray(list(per_image.values()), np.float64)
    out = {}
    for name, values in (("avS", rows.mean(axis=1)), ("S0.5", rows[:, 0])):
        res = bootstrap(
            (values,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
        out[name] = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="weights (default: shipped)")
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--wells", default="A11-A12,B11-B12,C01-C02,B13-B24")
    parser.add_argument("--method", default="boundary")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument(
        "--metric", default="AP", help="what the search maximises: AP (as shipped), AP50 or avS"
    )
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--cache", default=".cache/predictions")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument(
        "--grid",
        default=None,
        help="JSON {parameter: [candidates]} to search instead of the default grid "
        "(the parameters not given keep the model's stored values)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    model = load_model(args.model)
    wells = parse_names(args.wells)
    samples = read_bbbc010(args.data, wells, with_w1=False)
    truth = [s.masks for s in samples]
    predictions = [predict(s.image, model, tta=args.tta, cache=args.cache) for s in samples]
    stored = (getattr(model, "metadata", {}) or {}).get("segment_params") or {}
    grids = None
    if args.grid:  # the parameters not searched keep the model's stored values
        fixed = {k: [v] for k, v in stored.get(args.method, {}).items()}
        grids = {args.method: {**fixed, **json.loads(args.grid)}}
    in_sample = evaluate(
        [segment(p, args.method, **stored.get(args.method, {})) for p in predictions],
        truth,
        names=wells,
    )
    t0 = time.perf_counter()
    cv = cross_validate_tuning(
        predictions,
        truth,
        n_folds=args.folds,
        method=args.method,
        grids=grids,
        metric=args.metric,
        starts=[stored],
        names=wells,
    )
    t_cv = time.perf_counter() - t0
    rows = {
        "stored parameters (in-sample)": in_sample,
        f"{args.folds}-fold out-of-fold": cv.scores,
    }
    intervals = {k: per_image_intervals(v["per_image"], args.bootstrap) for k, v in rows.items()}
    print(
        format_table(
            {k: {x: y for x, y in v.items() if x != "per_image"} for k, v in rows.items()}
        )
    )
    for name, ci in intervals.items():
        print(
            f"{name}: 95 % interval over images "
            + ", ".join(f"{m} {lo:.3f}-{hi:.3f}" for m, (lo, hi) in ci.items())
        )
    for k, (fold, params) in enumerate(zip(cv.folds, cv.params, strict=True)):
        print(f"fold {k} ({', '.join(wells[i] for i in fold)}): tuned on the others: {params}")
    print(f"cross-validated search: {t_cv:.0f} s ({cv.trials} evaluations)")
    if args.json:
        out = {
            "model": args.model or "shipped",
            "wells": args.wells,
            "tta": args.tta,
            "folds": [[wells[i] for i in f] for f in cv.folds],
            "fold_params": cv.params,
            "results": rows,
            "intervals": intervals,
        }
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
