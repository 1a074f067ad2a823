"""Accuracy of a model on the synthetic sample worms (no data download needed).

Each seed gives one 520 x 696 image of :func:`napari_instseg.core.synthetic.sample_worms`
(12 worms, three crossing pairs, two touching worms; seed 2 is the image of napari's sample
menu). The image is predicted (``--tta``, default the model's recommended passes) and
segmented with the model's stored parameters, once with the mask outlines re-decided from
the image contrast (the default) and once without (``edge_thresholds=None``). Prints COCO
AP / AP50 / AP75 and avS per seed and their means. The masks are the exact drawn worms,
not BBBC010's hand-drawn convention, so these numbers are a smoke test of the shipped
model on clean, made-up data rather than a measure of accuracy on real worms.

    python benchmarks/eval_synthetic.py [--model W.safetensors] [--seeds 2,5,7,11]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from napari_instseg.core.evaluate import evaluate  # noqa: E402
from napari_instseg.core.instances import segment  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.synthetic import sample_worms  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "avS")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="weights (default: the shipped ones)")
    parser.add_argument("--seeds", default="2,5,7,11", help="comma-separated sample seeds")
    parser.add_argument("--tta", default="auto", help='test-time passes: 1, 2, 4, 8 or "auto"')
    args = parser.parse_args(argv)
    model = load_model(args.model)
    tta = args.tta if args.tta == "auto" else int(args.tta)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows: dict[str, list[list[float]]] = {"edges on": [], "edges off": []}
    for seed in seeds:
        sample = sample_worms(seed)
        prediction = predict(sample.image, model, tta=tta)
        for name, kwargs in (("edges on", {}), ("edges off", {"edge_thresholds": None})):
            result = evaluate([segment(prediction, **kwargs)], [sample])
            rows[name].append([float(result[m]) for m in METRICS])
    print(f"{'':>10} {'seed':>5} " + " ".join(f"{m:>6}" for m in METRICS))
    for name, values in rows.items():
        for seed, row in zip(seeds, values, strict=True):
            print(f"{name:>10} {seed:>5} " + " ".join(f"{v:6.3f}" for v in row))
        print(f"{name:>10} {'mean':>5} " + " ".join(f"{v:6.3f}" for v in np.mean(values, 0)))


if __name__ == "__main__":
    main()
