"""Time and memory of **Segment all** (core ``segment``) on a mosaic of BBBC010 images.

Builds an n x n mosaic of the first 16 BBBC010 wells exactly as
``benchmarks/napari_large.py`` does (``--tiles 1``: 520 x 696, ``4``: 2080 x 2784, ``8``:
4160 x 5568), predicts it with the shipped model (``predict(image, model, tta=1)``, cached
under ``--cache``), then times ``segment(prediction, method="auto")``: what the plugin's
**Segment all** runs with its default fields (the model's recommended method and tuned
parameters, with the untangling, the blob filter and the image-contrast edge refinement).

Reports the wall time of each repeat, the peak RSS of the process during the segment step
(psutil, sampled every 2 ms in a thread; the RSS before it is the baseline) and with
``--tracemalloc`` the peak of Python's traced allocations (numpy's included) during the
step. The run stops when its RSS passes ``--max-rss-gb`` (default 14). ``--profile``
prints a cProfile top 25 (cumulative) of one more run; ``--save FILE`` writes one digest
per mask (plus scores, classes, seeds) to compare two versions of the code bit for bit
with ``--compare FILE``::

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/segment_large.py --tiles 4
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import pstats
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mosaic(root: str, n: int) -> np.ndarray:
    """The n x n mosaic of ``benchmarks/napari_large.py`` (float32)."""
    from napari_instseg.core.io import bbbc010_wells, read_bbbc010

    wells = bbbc010_wells(root)[:16]
    samples = read_bbbc010(root, wells=wells, with_w1=False)
    rows = [[samples[(i * n + j) % len(samples)].image for j in range(n)] for i in range(n)]
    return np.block(rows).astype(np.float32)


class PeakRSS:
    """Peak resident memory of this process while the context is open (sampled)."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def watchdog(limit_gb: float) -> None:
    """Stop this process (exit status 3) as soon as its RSS passes ``limit_gb``."""
    import os

    import psutil

    process = psutil.Process()

    def watch() -> None:
        while True:
            rss = process.memory_info().rss
            if rss > limit_gb * 2**30:
                print(f"RSS {rss / 2**30:.1f} GB > --max-rss-gb {limit_gb}: stopped", flush=True)
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def digests(instances) -> dict[str, np.ndarray]:
    """One SHA-1 per mask and the other fields, for a bit-for-bit comparison."""
    masks = instances.masks
    return {
        "digests": np.array([hashlib.sha1(np.packbits(m).tobytes()).hexdigest() for m in masks]),
        "areas": instances.areas,
        "scores": instances.scores,
        "classes": instances.classes,
        "seeds": np.zeros((0, 2)) if instances.seeds is None else instances.seeds,
        "shape": np.array(masks.shape),
    }


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Print whether two :func:`digests` results are identical."""
    same = True
    for key in a:
        ok = a[key].shape == b[key].shape and bool(np.array_equal(a[key], b[key]))
        print(f"  {key}: {'identical' if ok else 'DIFFERENT'}")
        same &= ok
    return same


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/bbbc010")
    ap.add_argument("--tiles", type=int, default=4, choices=(1, 2, 4, 8))
    ap.add_argument("--cache", default=".cache/predictions", help="prediction cache (zarr)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile top 25 of one more run")
    ap.add_argument("--save", default="", help="write mask digests to this .npz")
    ap.add_argument("--compare", default="", help="compare the masks with this .npz")
    ap.add_argument("--max-rss-gb", type=float, default=14.0, help="stop above this RSS")
    args = ap.parse_args(argv)
    watchdog(args.max_rss_gb)

    from napari_instseg.core.instances import segment
    from napari_instseg.core.predict import predict
    from napari_instseg.core.weights import load_model

    image = mosaic(args.data, args.tiles)
    t0 = time.perf_counter()
    prediction = predict(image, load_model(), tta=1, cache=args.cache)
    print(
        f"image {image.shape[0]} x {image.shape[1]}; prediction {prediction.nbytes / 2**20:.0f}"
        f" MB ({time.perf_counter() - t0:.1f} s, cache {args.cache}); method {args.method} -> "
        f"{prediction.metadata.get('recommended_method')}",
        flush=True,
    )
    del image
    found = None
    for k in range(args.repeats):
        found = None
        gc.collect()
        if args.tracemalloc:
            tracemalloc.start()
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            found = segment(prediction, method=args.method)
            wall = time.perf_counter() - t0
        traced = ""
        if args.tracemalloc:
            traced = f", tracemalloc peak {tracemalloc.get_traced_memory()[1] / 2**20:.0f} MB"
            tracemalloc.stop()
        print(
            f"segment {k + 1}: {len(found)} instances, {wall:.2f} s; RSS {rss.start / 2**20:.0f}"
            f" MB before, peak {rss.peak / 2**20:.0f} MB (+{(rss.peak - rss.start) / 2**20:.0f})"
            f"{traced}; masks {found.masks.nbytes / 2**20:.0f} MB",
            flush=True,
        )
    if args.profile:
        found = None
        gc.collect()
        prof = cProfile.Profile()
        prof.enable()
        found = segment(prediction, method=args.method)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    if args.save:
        np.savez(args.save, **digests(found))
        print("saved", args.save)
    if args.compare:
        with np.load(args.compare) as ref:
            same = compare(dict(ref), digests(found))
        print("masks identical" if same else "MASKS DIFFER")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
