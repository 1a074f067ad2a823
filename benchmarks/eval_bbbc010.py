"""Accuracy of a model on BBBC010 wells, for every segmentation method.

Predicts each well once (zarr cache), segments it with each method and prints COCO AP/AP50/
AP75 and DSB S0.5/avS beside the published anchors; writes JSON with ``--json``.

    python benchmarks/eval_bbbc010.py --model runs/bbbc010/best.safetensors --wells B13-C02

``--tune`` first tunes each method's parameters on the same wells (coordinate search,
:mod:`napari_instseg.core.tune`); ``--write`` stores them in the weights' metadata.

Only the training half of BBBC010 is here; use your validation wells (B13-C02), never the
held-back test half.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_instseg.core.evaluate import evaluate, format_table  # noqa: E402
from napari_instseg.core.instances import segment  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="weights (default: shipped)")
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--wells", default="B13-C02")
    parser.add_argument("--methods", default="seeds,boundary,hybrid")
    parser.add_argument(
        "--params",
        default="{}",
        help="JSON dict of segment kwargs per method (with --tune: one more start)",
    )
    parser.add_argument("--cache", default=".cache/predictions")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--tta", type=int, default=1, help="test-time augmentation passes (1, 2, 4 or 8)"
    )
    parser.add_argument(
        "--tune", action="store_true", help="tune each method's parameters on these wells first"
    )
    parser.add_argument(
        "--write", action="store_true", help="with --tune: store the result in the weights"
    )
    args = parser.parse_args(argv)

    model = load_model(args.model)
    wells = parse_names(args.wells)
    samples = read_bbbc010(args.data, wells, with_w1=False)
    t0 = time.perf_counter()
    predictions = [predict(s.image, model, tta=args.tta, cache=args.cache) for s in samples]
    t_predict = time.perf_counter() - t0
    params = json.loads(args.params)
    if args.tune:
        from napari_instseg.core.tune import tune_segmentation, write_tuning

        t0 = time.perf_counter()
        # the search also starts from the model's stored parameters and any given ones
        stored = (getattr(model, "metadata", {}) or {}).get("segment_params") or {}
        tuned = tune_segmentation(
            predictions,
            [s.masks for s in samples],
            methods=args.methods.split(","),
            starts=[stored, params],
        )
        print(f"tuned in {time.perf_counter() - t0:.0f} s ({tuned.trials} evaluations)")
        print(json.dumps({"recommended": tuned.method, "params": tuned.params}, indent=1))
        params = tuned.params
        if args.write and args.model:
            write_tuning(args.model, tuned, images=args.wells, tta=args.tta)
            print(f"wrote the tuned parameters into {args.model}")
    results, timings, per_image = {}, {}, {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        instances = [segment(p, method=method, **params.get(method, {})) for p in predictions]
        timings[method] = (time.perf_counter() - t0) / len(samples)
        res = evaluate(instances, [s.masks for s in samples], names=wells)
        per_image[method] = res.pop("per_image", None)
        results[method] = res
    print(format_table(results))
    print(f"predict: {t_predict:.1f} s for {len(samples)} images, tta {args.tta} ({args.cache})")
    for method, t in timings.items():
        print(f"segment {method}: {t:.3f} s per image")
    if args.json:
        out = {
            "model": args.model or "shipped",
            "wells": args.wells,
            "tta": args.tta,
            "params": params,
            "results": results,
            "segment_s_per_image": timings,
            # DSB accuracy per image and IoU threshold (0.5 ... 0.9), to see where errors are
            "per_image": per_image,
        }
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
