"""Batch prediction with dask: overhead, scaling over workers, a large mosaic's memory.

Three measurements of :func:`napari_instseg.core.batch.run_batch` (``napari-instseg
predict ... --out OUT.zarr``) on synthetic worm images (``make_worms``, BBBC010-sized):

(a) **overhead**: the same ``--images`` TIFFs through the plain per-image loop (``predict``
    CLI with a folder ``--out``: read, predict, segment, measure, write TIFF + CSV) and
    through the dask batch path with one thread (same torch threads), median of
    ``--repeats`` runs each, alternating; overhead = batch / loop - 1.
(b) **workers**: a ``dask.distributed.LocalCluster`` of 1 and of 2 single-threaded worker
    processes (``OMP_NUM_THREADS=1`` in the workers, warmed up before timing) on the same
    images; throughput ratio = images/s with 2 workers / images/s with 1.
(c) **mosaic**: a ``--mosaic`` x ``--mosaic`` uint16 image built from 1000 x 1000
    ``make_worms`` well tiles (a plate montage), written to a zarr store first, then
    ``napari-instseg predict mosaic.zarr --out result.zarr --threads 2`` in a child
    process whose peak resident memory (the process and its children, sampled every 0.2 s
    with psutil) is recorded.
(d) **stitching on real images** (when BBBC010 is found): the first ``--wells`` wells in
    ``--real-chunk`` chunks against whole images (one chunk each), same model and method:
    instances per image, and for every whole-image instance of >= 200 px the IoU of the
    chunked label covering most of it.

Run (the full targets take about half an hour on 2 cores; run nothing else meanwhile)::

    .venv/bin/python benchmarks/batch.py                       # all three, writes docs
    .venv/bin/python benchmarks/batch.py --mosaic 2048 --images 4 --repeats 1 --no-docs

Results are printed and written to docs/benchmarks.md between the markers
``<!-- bench:batch:start -->`` and ``<!-- bench:batch:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
START = "<!-- bench:batch:start -->"
END = "<!-- bench:batch:end -->"


def make_images(folder: Path, n: int, shape: tuple[int, int]) -> list[Path]:
    import tifffile

    from napari_instseg.core.synthetic import make_worms

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sample = make_worms(shape=shape, n_worms=12, well=True, seed=100 + i)
        path = folder / f"img{i:03d}.tif"
        tifffile.imwrite(path, np.clip(sample.image, 0, 65535).astype(np.uint16))
        paths.append(path)
    return paths


def make_mosaic(path: Path, size: int, tile: int = 1000, variants: int = 16) -> dict:
    """Write a size x size uint16 zarr array tiled with make_worms wells (rotated copies).

    A montage of lit wells, like a plate overview: the shipped BBBC010 model expects the
    dark surround of a well (without it, it takes the whole synthetic field for worms).
    """
    import zarr

    from napari_instseg.core.synthetic import make_worms

    t0 = time.perf_counter()
    tiles = [
        np.clip(
            make_worms(shape=(tile, tile), n_worms=14, well=True, seed=i).image, 0, 65535
        ).astype(np.uint16)
        for i in range(variants)
    ]
    arr = zarr.create_array(
        str(path), shape=(size, size), chunks=(1024, 1024), dtype="uint16", overwrite=True
    )
    n = -(-size // tile)
    for i in range(n):
        band = np.zeros((min(tile, size - i * tile), size), np.uint16)
        for j in range(n):
            k = (i * n + j) % variants
            img = np.rot90(tiles[k], (i + j) % 4)
            w = min(tile, size - j * tile)
            band[:, j * tile : j * tile + w] = img[: band.shape[0], :w]
        arr[i * tile : i * tile + band.shape[0], :] = band
    return {"worms": n * n * 14, "seconds": time.perf_counter() - t0}


def run_loop(paths: list[Path], out: Path, method: str, model: str | None) -> float:
    from napari_instseg.cli import main

    shutil.rmtree(out, ignore_errors=True)
    argv = ["predict", *map(str, paths), "--out", str(out), "--method", method]
    argv += ["--device", "cpu"] + (["--model", model] if model else [])
    t0 = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            assert main(argv) == 0
        finally:
            sys.stdout = stdout
    return time.perf_counter() - t0


def run_dask(paths: list[Path], out: Path, method: str, model: str | None, **kwargs) -> dict:
    from napari_instseg.core.batch import run_batch

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_batch(paths, out, model=model, device="cpu", method=method, **kwargs)
    seconds = time.perf_counter() - t0
    assert result.ok, result.report
    return {"seconds": seconds, "report": result.report}


def overhead(paths, work: Path, method: str, model, repeats: int) -> dict:
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    run_loop(paths[:1], work / "warm", method, model)  # imports, model load
    run_dask(paths[:1], work / "warm.zarr", method, model, threads=1)
    loop, dask1, dask2 = [], [], []
    for _ in range(repeats):
        loop.append(run_loop(paths, work / "loop", method, model))
        dask1.append(run_dask(paths, work / "d1.zarr", method, model, threads=1)["seconds"])
        dask2.append(run_dask(paths, work / "d2.zarr", method, model, threads=2)["seconds"])
    m_loop, m1, m2 = (statistics.median(v) for v in (loop, dask1, dask2))
    return {
        "images": len(paths),
        "torch_threads": torch.get_num_threads(),
        "loop_s": loop,
        "dask_1_thread_s": dask1,
        "dask_2_threads_s": dask2,
        "loop_median_s": m_loop,
        "dask_1_thread_median_s": m1,
        "dask_2_threads_median_s": m2,
        "overhead_1_thread": m1 / m_loop - 1,
        "overhead_2_threads": m2 / m_loop - 1,
    }


def _warm() -> str:
    import torch

    import napari_instseg.core.batch  # noqa: F401

    return f"torch threads {torch.get_num_threads()}"


def workers(paths, work: Path, method: str, model, repeats: int) -> dict:
    from distributed import Client, LocalCluster

    out = {}
    for n in (1, 2):
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with (
            LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                env=env,
            ) as cluster,
            Client(cluster) as client,
        ):
            info = client.run(_warm)
            run_dask(paths[:n], work / f"warm{n}.zarr", method, model, scheduler=client)
            times = [
                run_dask(paths, work / f"w{n}.zarr", method, model, scheduler=client)["seconds"]
                for _ in range(repeats)
            ]
        out[n] = {
            "seconds": times,
            "median_s": statistics.median(times),
            "images_per_s": len(paths) / statistics.median(times),
            "workers": info,
        }
    out["ratio"] = out[2]["images_per_s"] / out[1]["images_per_s"]
    return out


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def mosaic(size: int, work: Path, method: str, model, threads: int, chunk: int) -> dict:
    import psutil

    src = work / "mosaic.zarr"
    built = make_mosaic(src, size)
    out = work / "mosaic-result.zarr"
    shutil.rmtree(out, ignore_errors=True)
    code = "import sys; from napari_instseg.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "predict", str(src), "--out", str(out)]
    cmd += ["--method", method, "--device", "cpu", "--threads", str(threads)]
    cmd += ["--chunk-size", str(chunk)] + (["--model", model] if model else [])
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = psutil.Process(child.pid)
    peak = 0
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    while child.poll() is None:
        peak = max(peak, _tree_rss(proc))
        time.sleep(0.2)
    reader.join()
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise RuntimeError("mosaic run failed:\n" + "".join(lines[-20:]))
    report = json.loads((out / "report.json").read_text())
    return {
        "size": size,
        "chunk_size": chunk,
        "threads": threads,
        "build_s": built["seconds"],
        "seconds": seconds,
        "peak_rss_gb": peak / 1e9,
        "instances": report["instances"],
        "chunks": report["chunks"]["total"],
        "stage_s": report["seconds"],
        "megapixels_per_s": size * size / 1e6 / seconds,
    }


def stitching_real(root: Path, wells: int, chunk: int, work: Path, method: str, model) -> dict:
    import zarr

    paths = sorted((root / "images").glob("*_w2_*.tif"))[:wells]
    labels = {}
    for size in (max(1024, chunk), chunk):
        out = work / f"real{size}.zarr"
        run_dask(paths, out, method, model, chunk_size=size, halo=64)
        labels[size] = zarr.open_array(str(out / "labels" / "instances" / "0"))[...]
    whole, chunked = labels[max(1024, chunk)], labels[chunk]
    ious, counts = [], []
    for a, b in zip(whole, chunked, strict=True):
        counts.append((len(np.unique(a)) - 1, len(np.unique(b)) - 1))
        for i in np.unique(a)[1:]:
            m = a == i
            if m.sum() < 200:
                continue
            vals, n = np.unique(b[m], return_counts=True)
            j = vals[np.argmax(n)]
            other = (b == j) if j else np.zeros_like(m)
            ious.append(float((m & other).sum() / (m | other).sum()))
    ious = np.asarray(ious)
    return {
        "images": len(paths),
        "chunk_size": chunk,
        "chunks_per_image": -(-whole.shape[1] // chunk) * -(-whole.shape[2] // chunk),
        "instances_whole": sum(c[0] for c in counts),
        "instances_chunked": sum(c[1] for c in counts),
        "compared": len(ious),
        "median_iou": float(np.median(ious)) if len(ious) else float("nan"),
        "iou_above_0.8": float((ious > 0.8).mean()) if len(ious) else float("nan"),
    }


def markdown(res: dict, args) -> str:
    from napari_instseg.core.device import cpu_name

    lines = [
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores; load average before the run "
        f"{res['load'][0]:.2f}; torch {res['torch']}, dask {res['dask']}",
        f"- Command: `{' '.join(['.venv/bin/python', 'benchmarks/batch.py', *sys.argv[1:]])}`",
        f"- Images: {args.size} synthetic worms (`make_worms`, 12 worms, well), "
        f"method `{args.method}`, model: {args.model or 'shipped'}",
        "",
        "| measurement | result | target |",
        "|---|---|---|",
    ]
    if "overhead" in res:
        o = res["overhead"]
        lines.append(
            f"| (a) plain loop, {o['images']} images ({o['torch_threads']} torch threads) | "
            f"{o['loop_median_s']:.2f} s | |"
        )
        lines.append(
            f"| (a) dask threads, 1 thread (same torch threads) | "
            f"{o['dask_1_thread_median_s']:.2f} s (**{100 * o['overhead_1_thread']:+.1f} %**) "
            "| <= +10 % |"
        )
        lines.append(
            f"| (a) dask threads, 2 threads x 1 torch thread | "
            f"{o['dask_2_threads_median_s']:.2f} s ({100 * o['overhead_2_threads']:+.1f} %) | |"
        )
    if "workers" in res:
        w = res["workers"]
        lines.append(
            f"| (b) LocalCluster 1 worker x 1 thread | {w[1]['images_per_s']:.3f} images/s | |"
        )
        lines.append(
            f"| (b) LocalCluster 2 workers x 1 thread | {w[2]['images_per_s']:.3f} images/s "
            f"(**{w['ratio']:.2f} x**) | >= 1.7 x |"
        )
    if "mosaic" in res:
        m = res["mosaic"]
        lines.append(
            f"| (c) {m['size']} x {m['size']} mosaic, chunks {m['chunk_size']}, "
            f"{m['threads']} threads: peak RSS (process tree) | **{m['peak_rss_gb']:.2f} GB** "
            "| <= 8 GB |"
        )
        lines.append(
            f"| (c) same: wall time, {m['chunks']} chunks, {m['instances']} instances | "
            f"{m['seconds']:.0f} s ({m['megapixels_per_s']:.2f} Mpx/s; stages "
            f"{m['stage_s']['chunks']:.0f} / {m['stage_s']['stitch']:.0f} / "
            f"{m['stage_s']['write']:.0f} s chunks / stitch / write) | |"
        )
    if "real" in res:
        r = res["real"]
        lines.append(
            f"| (d) BBBC010, {r['images']} wells in {r['chunk_size']} px chunks "
            f"({r['chunks_per_image']} per image) vs whole images: instances | "
            f"{r['instances_chunked']} vs {r['instances_whole']} | equal |"
        )
        lines.append(
            f"| (d) same: IoU with the whole-image instance ({r['compared']} of >= 200 px) | "
            f"median {r['median_iou']:.3f}, {100 * r['iou_above_0.8']:.0f} % above 0.8 | |"
        )
    missing = [
        name
        for key, name in (
            ("overhead", "(a) overhead"),
            ("workers", "(b) workers"),
            ("mosaic", "(c) mosaic"),
            ("real", "(d) stitching on BBBC010"),
        )
        if key not in res
    ]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)}."]
    lines += [
        "",
        "(a) and (b) are medians of the runs listed in the JSON output "
        "(`--json`); timings include reading the TIFFs, writing every output, and for "
        "the dask path stitching and the report. (c) times the child process only (start-up, "
        "model load, chunks, stitching, pyramids, table); the mosaic zarr is written before.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    from napari_instseg.cli.bench import write_section as write_between_markers

    write_between_markers(path, text, START, END, "## Batch prediction (dask, OME-Zarr)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images for (a) and (b) (8)")
    parser.add_argument("--size", default="520x696", help="image size HxW (520x696)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of (a) and (b) (3)")
    parser.add_argument("--mosaic", type=int, default=20000, help="mosaic side, 0 = skip")
    parser.add_argument("--chunk-size", type=int, default=1024, help="mosaic chunk (1024)")
    parser.add_argument("--threads", type=int, default=2, help="mosaic threads (2)")
    parser.add_argument("--wells", type=int, default=10, help="BBBC010 wells for (d), 0 = skip")
    parser.add_argument("--real-chunk", type=int, default=256, help="chunk size for (d) (256)")
    parser.add_argument("--method", default="auto", help="segmentation method (auto)")
    parser.add_argument("--model", help="weights file (default: shipped)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["overhead", "workers"])
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write all numbers here")
    parser.add_argument("--no-docs", action="store_true", help="do not edit docs/benchmarks.md")
    args = parser.parse_args()

    import dask
    import torch

    shape = tuple(int(v) for v in args.size.lower().split("x"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nis-batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"load": os.getloadavg(), "torch": torch.__version__, "dask": dask.__version__}
    try:
        needs_images = not {"overhead", "workers"} <= set(args.skip)
        paths = make_images(work / "images", args.images, shape) if needs_images else []
        if "overhead" not in args.skip:
            res["overhead"] = overhead(paths, work, args.method, args.model, args.repeats)
            print(json.dumps(res["overhead"], indent=1), flush=True)
        if "workers" not in args.skip:
            res["workers"] = workers(paths, work, args.method, args.model, args.repeats)
            print(json.dumps(res["workers"], indent=1, default=str), flush=True)
        if args.mosaic:
            res["mosaic"] = mosaic(
                args.mosaic, work, args.method, args.model, args.threads, args.chunk_size
            )
            print(json.dumps(res["mosaic"], indent=1), flush=True)
        root = Path(
            os.environ.get("NAPARI_INSTSEG_BBBC010") or REPO.parent / "shared/data/bbbc010"
        )
        if args.wells and (root / "images").is_dir():
            res["real"] = stitching_real(
                root, args.wells, args.real_chunk, work, args.method, args.model
            )
            print(json.dumps(res["real"], indent=1), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = markdown(res, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if not args.no_docs:
        write_section(REPO / "docs" / "benchmarks.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
