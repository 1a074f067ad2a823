"""``napari-instseg bench``: speed of growing, similarity, prediction and segmentation.

At 520 x 696 (BBBC010's size) it measures, as medians over repeats in one run:
click-to-grow latency (random seeds inside worms), the similarity map, full-image prediction
(when a model is given or shipped), each automatic segmentation method, the evaluation
(COCO AP and DSB accuracy) of a series of 50 images, and a *floor*: one
(H*W x D) matrix-vector product, the least a click can cost. Without a trained model the
prediction is the oracle (:mod:`napari_instseg.core.oracle`) on synthetic worms, whose
segmentation accuracy is reported too. Results go to stdout, and to JSON or to a section
of a Markdown file (``--out docs/benchmarks.md``) between markers.

Example::

    napari-instseg bench --repeats 50 --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

EVALUATE_IMAGES = 50  # images per timed evaluation (issue 4: 50 images in <= 30 s)
START = "<!-- bench:instances:start -->"
END = "<!-- bench:instances:end -->"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    parser.add_argument("--model", help="weights file, or 'default' for the shipped model")
    parser.add_argument("--repeats", type=int, default=30, help="repeats per timing (30)")
    parser.add_argument("--out", type=Path, help="write results: *.json, or a Markdown file")
    parser.add_argument("--size", default="520x696", help="image size HxW (520x696)")
    parser.add_argument("--dim", type=int, default=16, help="oracle embedding dimension (16)")
    parser.add_argument("--device", default="auto", help="device for --model")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")


def machine() -> dict[str, object]:
    """CPU model, cores, torch threads, versions."""
    from napari_instseg.core.device import cpu_name

    cpu = cpu_name()
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Wall-clock median and 90th percentile, and CPU-time median (ms) of ``fn``.

    The CPU time of the calling thread (``time.thread_time``) is what the step costs when
    the machine is busy with other work (wall-clock time then includes waiting); with
    several BLAS threads it undercounts, so the bench is meant for one thread.
    """
    for _ in range(warmup):
        fn()
    ts, cpu = [], []
    for _ in range(max(repeats, 1)):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return {
        "median_ms": float(np.median(ts)),
        "p90_ms": float(np.percentile(ts, 90)),
        "cpu_median_ms": float(np.median(cpu)),
        "n": len(ts),
    }


def _synthetic(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and masks of synthetic worms (make_worms, or simple drawn worms)."""
    try:
        from ..core.synthetic import make_worms

        big = min(shape) >= 400
        s = make_worms(
            shape,
            n_worms=12 if big else 4,
            length=(80, 170) if big else (30, 60),
            n_crossings=3 if big else 1,
            n_touching=2 if big else 1,
            seed=seed,
        )
        return s.image, s.masks
    except ImportError:  # pragma: no cover - synthetic data lands separately
        from scipy import ndimage
        from skimage.draw import line

        rng = np.random.default_rng(seed)
        masks = []
        for _ in range(12):
            r0, c0 = rng.integers(40, shape[0] - 40), rng.integers(40, shape[1] - 40)
            ang, length = rng.uniform(0, np.pi), rng.uniform(60, 150)
            r1 = int(np.clip(r0 + length * np.sin(ang), 0, shape[0] - 1))
            c1 = int(np.clip(c0 + length * np.cos(ang), 0, shape[1] - 1))
            m = np.zeros(shape, bool)
            rr, cc = line(int(r0), int(c0), r1, c1)
            m[rr, cc] = True
            masks.append(ndimage.distance_transform_edt(~m) <= 4)
        masks_arr = np.array(masks)
        return 3000 - 1500 * masks_arr.any(0).astype(np.float32), masks_arr


def run_bench(
    repeats: int = 30,
    model: str | None = None,
    size: tuple[int, int] = (520, 696),
    dim: int = 16,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, object]:
    """Run every benchmark and return the results as a dict.

    Parameters
    ----------
    repeats : int
        Repeats per timing (segmentation uses a fifth, at least 3).
    model : str, optional
        Weights file or ``"default"``; None: use the oracle prediction.
    size : tuple of int
        Image size.
    dim : int
        Oracle embedding dimension.
    device : str
        Device for the model.
    seed : int
        Random seed.

    Returns
    -------
    dict
        ``machine``, ``command``, ``prediction`` (source), ``timings`` (name -> median_ms,
        p90_ms, n, ratio_to_floor), ``accuracy`` (oracle only: method -> AP, avS, ...).
    """
    from ..core.edges import local_contrast
    from ..core.evaluate import evaluate
    from ..core.grow import Grower, grow
    from ..core.instances import METHODS, segment
    from ..core.oracle import prediction_from_masks
    from ..core.pick import grow_from_segments

    image, masks = _synthetic(size, seed)
    timings: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    prediction = None
    source = "oracle"
    if model is not None:
        try:
            from ..core.predict import predict
            from ..core.weights import load_model

            net = load_model(None if model == "default" else model)
            prediction = predict(image, model=net, device=device)  # warm-up
            timings["predict"] = timeit(
                lambda: predict(image, model=net, device=device), max(3, repeats // 10), 0
            )
            timings["predict_tta8"] = timeit(
                lambda: predict(image, model=net, device=device, tta=8), 3, 0
            )
            source = f"model {model}"
        except (ImportError, FileNotFoundError, ValueError) as err:
            notes.append(f"predict skipped: {err}")
    else:
        notes.append("predict skipped: no --model given (oracle prediction used)")
    if prediction is None:
        prediction = prediction_from_masks(masks, embedding_dim=dim, seed=seed)

    grower = Grower(prediction)
    timings["grower_build"] = timeit(lambda: Grower(prediction), 3, 0)
    flat = grower.flat
    vec = flat[:, flat.shape[1] // 2].copy()
    many = max(repeats, 30) * 3
    timings["floor_matvec"] = timeit(lambda: vec @ flat, many)

    rng = np.random.default_rng(seed)
    single = masks.sum(axis=0) == 1
    inside = np.argwhere(single & (prediction.foreground > 0.5))
    if len(inside) == 0:
        inside = np.argwhere(np.ones(prediction.shape, bool))
    picks = inside[rng.integers(0, len(inside), max(repeats, 1))]
    it = iter(list(picks) * 3)
    timings["grow"] = timeit(lambda: grower.grow(tuple(next(it)), tau=0.5), repeats)
    it = iter(list(picks) * 3)
    timings["grow_barrier"] = timeit(
        lambda: grower.grow(tuple(next(it)), tau=0.5, boundary_barrier=0.5), repeats
    )
    it = iter(list(picks) * 3)
    timings["similarity"] = timeit(lambda: grower.similarity(tuple(next(it))), repeats)
    # a click as the plugin makes it with the shipped model: the mask's outline re-decided
    # by the image contrast (core/edges.py); the oracle gets the synthetic image's contrast
    if getattr(prediction, "contrast", None) is None:
        prediction = dataclasses.replace(prediction, contrast=local_contrast(image))
    edge_grower = Grower(prediction)
    it = iter(list(picks) * 3)
    timings["grow_edges"] = timeit(
        lambda: grow(edge_grower, tuple(next(it)), tau=0.5, edge_thresholds=(0.88, 0.98)),
        repeats,
    )

    # a click that starts from the automatic segments (core/pick.py, the plugin's default
    # for a tuned model), the segments made once beforehand (the widget does that with the
    # layers, off the GUI thread)
    segments = segment(prediction, method="boundary")
    it = iter(list(picks) * 3)
    timings["click_from_segments"] = timeit(
        lambda: grow_from_segments(prediction, tuple(next(it)), instances=segments), repeats
    )

    accuracy: dict[str, dict[str, float]] = {}
    seg_repeats = max(3, repeats // 5)
    for method in METHODS:
        timings[f"segment_{method}"] = timeit(
            lambda method=method: segment(prediction, method=method), seg_repeats
        )
        if source == "oracle":
            res = evaluate([segment(prediction, method=method)], [masks])
            accuracy[method] = {
                k: round(float(res[k]), 4) for k in ("AP", "AP50", "AP75", "avS")
            } | {"S0.5": round(float(res["S"]["0.5"]), 4)}
    # scoring a series: COCO AP and DSB accuracy of EVALUATE_IMAGES image pairs (this
    # image's boundary segmentation against its truth, repeated)
    segmented = segment(prediction, method="boundary")
    timings[f"evaluate_{EVALUATE_IMAGES}"] = timeit(
        lambda: evaluate([segmented] * EVALUATE_IMAGES, [masks] * EVALUATE_IMAGES), 3, 0
    )
    floor = timings["floor_matvec"]["median_ms"]
    cpu_floor = timings["floor_matvec"]["cpu_median_ms"]
    for name, t in timings.items():
        if name in ("floor_matvec", f"evaluate_{EVALUATE_IMAGES}"):
            continue  # the floor itself; a whole series is no multiple of one click
        if "median_ms" in t:
            t["ratio_to_floor"] = t["median_ms"] / floor
        if "cpu_median_ms" in t and cpu_floor > 0:
            t["cpu_ratio_to_floor"] = t["cpu_median_ms"] / cpu_floor
    return {
        "machine": machine(),
        "command": "napari-instseg bench " + " ".join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench"
        else f"run_bench(repeats={repeats}, model={model!r})",
        "size": list(size),
        "embedding_dim": int(prediction.embedding_dim),
        "n_worms": int(len(masks)),
        "prediction": source,
        "timings": timings,
        "accuracy": accuracy,
        "notes": notes,
    }


def to_markdown(res: dict[str, object]) -> str:
    """Markdown section for docs/benchmarks.md."""
    m = res["machine"]
    h, w = res["size"]  # type: ignore[misc]
    lines = [
        f"- Machine: {m['cpu']}, {m['cores']} cores, torch threads "  # type: ignore[index]
        f"{m.get('torch_threads', '?')}, numpy {m['numpy']}, torch {m.get('torch', '?')}, "  # type: ignore[union-attr,index]
        f"load average {m.get('load_average_1min', '?')} (shared machine)",  # type: ignore[union-attr]
        f"- Command: `{res['command']}`",
        f"- Image: {h} x {w}, D = {res['embedding_dim']}, {res['n_worms']} synthetic worms "
        f"(make_worms, with crossings and touching pairs); prediction: {res['prediction']}",
        "- Floor: one (H*W x D) @ (D,) matrix-vector product (numpy float32), same run.",
        "",
        "- Wall = wall-clock (includes waiting when the machine is busy); CPU = CPU time of",
        "  the benchmark thread (what the step costs). Medians over the repeats.",
        "",
        "| step | wall median ms | wall p90 ms | wall x floor | CPU median ms | CPU x floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def f(v: object, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    for name, t in res["timings"].items():  # type: ignore[union-attr]
        lines.append(
            f"| {name} | {t['median_ms']:.2f} | {f(t.get('p90_ms'), '.2f')} | "
            f"{f(t.get('ratio_to_floor'), '.1f')} | {f(t.get('cpu_median_ms'), '.2f')} | "
            f"{f(t.get('cpu_ratio_to_floor'), '.1f')} |"
        )
    if res["accuracy"]:
        lines += [
            "",
            "Oracle accuracy on the same image (perfect embeddings/boundaries; checks the",
            "extraction code, not the network):",
            "",
            "| method | AP | AP50 | AP75 | avS | S0.5 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method, a in res["accuracy"].items():  # type: ignore[union-attr]
            lines.append(
                f"| {method} | {a['AP']:.3f} | {a['AP50']:.3f} | {a['AP75']:.3f} | "
                f"{a['avS']:.3f} | {a['S0.5']:.3f} |"
            )
    for note in res["notes"]:  # type: ignore[union-attr]
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def write_section(
    path: Path,
    text: str,
    start: str = START,
    end: str = END,
    heading: str = "## Instance extraction and click-to-grow speed",
) -> None:
    """Replace the text between two markers of a Markdown file.

    Parameters
    ----------
    path : Path
        The Markdown file (created with a ``# Benchmarks`` title when missing).
    text : str
        What goes between the markers.
    start, end : str
        The markers (default: this benchmark's).
    heading : str
        Section heading written before the markers when they are not in the file yet
        (the section is then appended).
    """
    block = f"{start}\n{text}{end}\n"
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + heading + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks, print them and write ``--out``."""
    try:
        h, w = (int(v) for v in str(args.size).lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 520x696, got {args.size!r}") from None
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    res = run_bench(args.repeats, args.model, (h, w), args.dim, args.device, args.seed)
    text = to_markdown(res)
    print(text)
    if args.out:
        if args.out.suffix == ".json":
            args.out.write_text(json.dumps(res, indent=2))
        else:
            write_section(args.out, text)
        print(f"wrote {args.out}")
    return 0
