"""Accuracy of the three segmentation methods on oracle predictions of synthetic worms.

``--lookalike`` gives each touching pair one embedding (an embedding failure), which is
where the boundary barrier of the hybrid method matters. Usage::

    OMP_NUM_THREADS=1 python benchmarks/oracle_methods.py [--lookalike] [--noise 0.05]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_instseg.core.evaluate import evaluate, format_table
from napari_instseg.core.instances import METHODS, segment
from napari_instseg.core.oracle import prediction_from_masks
from napari_instseg.core.synthetic import make_worms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--lookalike", action="store_true")
    args = parser.parse_args()
    samples, preds = [], []
    for i in range(args.images):
        s = make_worms(
            (520, 696), n_worms=12, length=(80, 170), n_crossings=3, n_touching=2, seed=i
        )
        p = prediction_from_masks(s.masks, embedding_dim=16, seed=i)
        if args.lookalike:
            only = s.masks.sum(0) == 1
            for a, b in s.metadata["touching"]:
                ra, ca = np.argwhere(s.masks[a] & only)[0]
                p.embeddings[:, s.masks[b] & only] = p.embeddings[:, ra, ca][:, None]
        if args.noise:
            rng = np.random.default_rng(i)
            p.embeddings += rng.normal(0, args.noise, p.embeddings.shape).astype(np.float32)
        samples.append(s)
        preds.append(p)
    results = {}
    for method in METHODS:
        t0 = time.perf_counter()
        out = [segment(p, method=method) for p in preds]
        sec = (time.perf_counter() - t0) / len(preds)
        results[method] = evaluate(out, [s.masks for s in samples])
        print(f"{method}: {sec:.3f} s per image")
    print(format_table(results))


if __name__ == "__main__":
    main()
