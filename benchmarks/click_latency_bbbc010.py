"""Click-to-grow latency on real BBBC010 maps, with and without the contrast outlines.

``napari-instseg bench`` times clicks on an oracle prediction of synthetic worms; this
times them on the shipped model's maps of real images (one pass), as the plugin makes
them: ``grow(..., edge_thresholds="auto")`` (the mask's outline re-decided by the image
contrast, core/edges.py) and ``edge_thresholds=None``, beside the floor of one
(H*W x D) matrix-vector product, clicks interleaved so machine load hits all alike.
``--factor 2`` resizes the images first (worms twice as wide) and predicts at scale 1/2:
the clicks then grow on the network's grid and their masks come back (core/grow.py); the
floor stays that of the image's grid.

    OMP_NUM_THREADS=1 python benchmarks/click_latency_bbbc010.py --wells A11,B13 [--factor 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from skimage.transform import resize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_instseg.core.grow import Grower, grow  # noqa: E402
from napari_instseg.core.io import read_bbbc010  # noqa: E402
from napari_instseg.core.predict import predict  # noqa: E402
from napari_instseg.core.train import parse_names  # noqa: E402
from napari_instseg.core.weights import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/bbbc010")
    parser.add_argument("--wells", default="A11,B13", help="one live and one dead well")
    parser.add_argument("--clicks", type=int, default=100, help="clicks per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factor", type=float, default=1.0, help="resize the images first")
    args = parser.parse_args(argv)

    model = load_model()
    times: dict[str, list[float]] = {"refined": [], "plain": [], "floor": []}
    for sample in read_bbbc010(args.data, parse_names(args.wells), with_w1=False):
        image = sample.image
        if args.factor != 1.0:
            shape = tuple(round(n * args.factor) for n in image.shape)
            image = resize(image, shape, order=1, preserve_range=True, anti_aliasing=False)
        prediction = predict(image, model, scale=1.0 / args.factor)
        grower = Grower(prediction)
        rng = np.random.default_rng(args.seed)
        inside = np.argwhere(prediction.foreground > 0.7)
        clicks = inside[rng.integers(0, len(inside), args.clicks)]
        vector = grower.flat[:, grower.flat.shape[1] // 2].copy()
        for click in clicks:
            for name, edges in (("refined", "auto"), ("plain", None)):
                t0 = time.perf_counter()
                grow(prediction, [tuple(click)], tau=0.5, edge_thresholds=edges)
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vector @ grower.flat
            times["floor"].append(time.perf_counter() - t0)
    floor = float(np.median(times["floor"]))
    print(
        f"{len(times['floor'])} clicks on {args.wells} x {args.factor:g}, shipped model, one pass"
    )
    for name, values in times.items():
        median = float(np.median(values))
        print(
            f"{name:8s} median {median * 1e3:6.2f} ms  p90 {np.percentile(values, 90) * 1e3:6.2f}"
            f" ms  x floor {median / floor:4.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
