"""Time ``read_bbbc010`` on the BBBC010 folder: all wells, with and without w1, per thread count.

Usage::

    OMP_NUM_THREADS=1 taskset -c 0,1 python benchmarks/read_bbbc010.py \\
        /work/shared/data/bbbc010 --threads 1 2 --repeats 7

Prints the best and median wall time of each setting (the files are read once first, so
the operating system's file cache is warm for every timed run).
"""

from __future__ import annotations

import argparse
import statistics
import time

from napari_instseg.core.io import read_bbbc010


def main() -> None:
    """Run the timings and print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="BBBC010 folder (images/, masks/)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    samples = read_bbbc010(args.root)  # warm the file cache
    n_masks = sum(len(s.masks) for s in samples)
    print(f"{len(samples)} wells, {n_masks} masks")
    for with_w1 in (True, False):
        for threads in args.threads:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                read_bbbc010(args.root, with_w1=with_w1, threads=threads)
                times.append(time.perf_counter() - t0)
            print(
                f"with_w1={with_w1!s:5} threads={threads}: best {min(times):.2f} s, "
                f"median {statistics.median(times):.2f} s"
            )


if __name__ == "__main__":
    main()
