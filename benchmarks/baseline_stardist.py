"""StarDist trained from scratch on our BBBC010 training wells, scored with our evaluation.

A competitor baseline (session 30): StarDist2D (star-convex polygons) trained on exactly the
32 training images of the shipped model (wells A01-A10, A13-A24, B01-B10, bright-field w2),
scored on exactly our 18 held-out images (A11-A12, B11-B12, C01-C02, B13-B24) with
:func:`napari_instseg.core.evaluate.evaluate` (COCO mask AP, DSB S0.5-S0.9 and avS, per
image averaged) against the per-worm masks with their overlaps kept.

StarDist and TensorFlow are not dependencies of this project: ``train`` and ``predict`` run
in a separate virtual environment (``pip install tensorflow-cpu stardist tifffile``),
``prepare`` and ``score`` in the project's own. Nothing here is imported by the tests.

Steps (data and outputs stay outside the repository)::

    # 1. project venv: read the wells with our reader, write images + label images
    .venv/bin/python benchmarks/baseline_stardist.py prepare \\
        --data ../shared/data/bbbc010 --out /work/bench/s30sd/data.npz
    # 2. StarDist venv, one core: train from scratch, then optimise the thresholds on
    #    the 4 training images held out of StarDist's training loop (--val)
    OMP_NUM_THREADS=1 taskset -c 1 /work/bench/s30sd/venv/bin/python \\
        benchmarks/baseline_stardist.py train --npz /work/bench/s30sd/data.npz \\
        --basedir /work/bench/s30sd/models --epochs 60 --steps 30
    # 3. StarDist venv: predict the 18 held-out and the 32 training images
    OMP_NUM_THREADS=1 taskset -c 1 /work/bench/s30sd/venv/bin/python \\
        benchmarks/baseline_stardist.py predict --npz /work/bench/s30sd/data.npz \\
        --basedir /work/bench/s30sd/models --out /work/bench/s30sd/pred.npz
    # 4. project venv: score with our evaluation
    .venv/bin/python benchmarks/baseline_stardist.py score \\
        --pred /work/bench/s30sd/pred.npz --data ../shared/data/bbbc010

Labels for training: StarDist's label image holds one object per pixel, so where worms
overlap the pixel goes to the smaller worm (masks painted largest first), then
``fill_label_holes``. Input: csbdeep's ``normalize(img, 1, 99.8)`` per image.

Scoring: each label of ``predict_instances`` becomes one mask, scored by its polygon's
probability (``details["prob"][label - 1]``, the order ``polygons_to_label`` paints in);
labels wholly painted over by a more probable polygon are dropped. ``score`` also reports
the polygons themselves (``details["coord"]``, each drawn on its own, so they may overlap)
as a second row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

TRAIN = "A01-A10,A13-A24,B01-B10"
HELD_OUT = "A11-A12,B11-B12,C01-C02,B13-B24"
VAL = "A10,A24,B05,B10"  # StarDist's own validation images, taken from TRAIN


def _names(spec: str) -> list[str]:
    """Expand ``"A01-A03,B05"`` into well names (same rows only)."""
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [f"{a[0]}{i:02d}" for i in range(int(a[1:]), int(b[1:]) + 1)]
        else:
            out.append(part)
    return out


def _one_core() -> None:
    """Run TensorFlow on one thread each way (the caller pins the process to a core)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def prepare(args: argparse.Namespace) -> None:
    """Read all 50 wells' bright-field images with our reader; labels with overlaps resolved."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from napari_instseg.core.io import read_bbbc010

    wells = _names(TRAIN) + _names(HELD_OUT)
    samples = read_bbbc010(args.data, wells, with_w1=False)
    images, labels = [], []
    for s in samples:
        masks = np.asarray(s.masks, bool)
        lab = np.zeros(masks.shape[1:], np.uint16)
        for k in np.argsort(-masks.sum(axis=(1, 2)), kind="stable"):  # largest first
            lab[masks[k]] = k + 1  # the smaller worm takes the overlap
        images.append(np.asarray(s.image, np.float32))
        labels.append(lab)
    np.savez_compressed(
        args.out, wells=np.array(wells), images=np.stack(images), labels=np.stack(labels)
    )
    print(f"wrote {len(wells)} images to {args.out}")


def _load(npz: str, spec: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    d = np.load(npz)
    wells = list(d["wells"])
    idx = [wells.index(w) for w in _names(spec)]
    return [wells[i] for i in idx], [d["images"][i] for i in idx], [d["labels"][i] for i in idx]


def _augment(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """StarDist example notebook's augmenter: flips/rot90, intensity scale/shift, noise.

    The legacy global ``np.random`` state, as in the notebook, seeded in :func:`train`.
    """
    perm = tuple(np.random.permutation(2))  # noqa: NPY002
    x, y = x.transpose(perm), y.transpose(perm)
    for ax in (0, 1):
        if np.random.rand() > 0.5:  # noqa: NPY002
            x, y = np.flip(x, axis=ax), np.flip(y, axis=ax)
    x = x * np.random.uniform(0.6, 2) + np.random.uniform(-0.2, 0.2)  # noqa: NPY002
    x = x + 0.02 * np.random.uniform(0, 1) * np.random.normal(0, 1, x.shape)  # noqa: NPY002
    return x, y


def train(args: argparse.Namespace) -> None:
    """Train StarDist2D from scratch; optimise its thresholds on the --val images."""
    _one_core()
    from csbdeep.utils import normalize
    from stardist import fill_label_holes
    from stardist.models import Config2D, StarDist2D

    np.random.seed(args.seed)  # noqa: NPY002 (stardist samples its patches from the legacy global state)
    val = set(_names(args.val))
    wells, xs, ys = _load(args.npz, TRAIN)
    xs = [normalize(x, 1, 99.8, axis=(0, 1)).astype(np.float32) for x in xs]
    ys = [fill_label_holes(y.astype(np.int32)) for y in ys]
    xt = [x for w, x in zip(wells, xs, strict=True) if w not in val]
    yt = [y for w, y in zip(wells, ys, strict=True) if w not in val]
    xv = [x for w, x in zip(wells, xs, strict=True) if w in val]
    yv = [y for w, y in zip(wells, ys, strict=True) if w in val]
    print(f"train {len(xt)} images, validation {len(xv)} ({sorted(val)})", flush=True)
    conf = Config2D(
        n_rays=args.rays,
        grid=(2, 2),
        n_channel_in=1,
        use_gpu=False,
        train_tensorboard=False,
        train_patch_size=(args.patch, args.patch),
        train_batch_size=args.batch,
        train_epochs=args.epochs,
        train_steps_per_epoch=args.steps,
    )
    print(conf, flush=True)
    model = StarDist2D(conf, name=args.name, basedir=args.basedir)
    t0 = time.perf_counter()
    model.train(xt, yt, validation_data=(xv, yv), augmenter=_augment)
    t_train = time.perf_counter() - t0
    print(f"trained in {t_train:.0f} s", flush=True)
    t0 = time.perf_counter()
    model.optimize_thresholds(xv, yv)
    print(f"thresholds {model.thresholds} in {time.perf_counter() - t0:.0f} s", flush=True)
    info = {"train_s": t_train, "val": sorted(val), "thresholds": dict(model.thresholds._asdict())}
    (Path(args.basedir) / args.name / "run.json").write_text(json.dumps(info, indent=1))


def predict(args: argparse.Namespace) -> None:
    """Predict the held-out and training images; keep labels, probabilities and polygons."""
    _one_core()
    from csbdeep.utils import normalize
    from stardist.models import StarDist2D

    model = StarDist2D(None, name=args.name, basedir=args.basedir)
    out, times = {}, []
    for spec in (HELD_OUT, TRAIN):
        wells, xs, _ = _load(args.npz, spec)
        for w, x in zip(wells, xs, strict=True):
            t0 = time.perf_counter()
            lab, det = model.predict_instances(
                normalize(x, 1, 99.8, axis=(0, 1)),
                prob_thresh=args.prob_thresh,
                nms_thresh=args.nms_thresh,
            )
            times.append(time.perf_counter() - t0)
            out[f"{w}_labels"] = lab.astype(np.uint16)
            out[f"{w}_prob"] = np.asarray(det["prob"], np.float32)
            out[f"{w}_coord"] = np.asarray(det["coord"], np.float32)
    np.savez_compressed(args.out, **out)
    t = np.array(times[1:])  # the first call builds the graph
    print(f"predict_instances: median {np.median(t):.2f} s, mean {t.mean():.2f} s per image")


def _instances(pred: dict, well: str, shape: tuple[int, int], polygons: bool) -> object:
    from skimage.draw import polygon

    from napari_instseg.core.types import Instances

    prob = pred[f"{well}_prob"]
    if polygons:
        masks = np.zeros((len(prob), *shape), bool)
        for k, c in enumerate(pred[f"{well}_coord"]):
            rr, cc = polygon(c[0], c[1], shape)
            masks[k, rr, cc] = True
    else:
        lab = pred[f"{well}_labels"]
        masks = lab[None] == np.arange(1, len(prob) + 1)[:, None, None]
    keep = masks.any(axis=(1, 2))
    return Instances(masks=masks[keep], scores=prob[keep])


def score(args: argparse.Namespace) -> None:
    """Score the predictions with our evaluation (overlaps kept in the truth)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from napari_instseg.core.evaluate import evaluate, format_table
    from napari_instseg.core.io import read_bbbc010

    pred = dict(np.load(args.pred))
    results = {}
    for title, spec in (("held-out 18", HELD_OUT), ("training 32", TRAIN)):
        wells = _names(spec)
        samples = read_bbbc010(args.data, wells, with_w1=False)
        for polygons in (False, True):
            inst = [
                _instances(pred, w, s.image.shape, polygons)
                for w, s in zip(wells, samples, strict=True)
            ]
            res = evaluate(inst, [s.masks for s in samples], names=wells)
            res.pop("per_image", None)
            results[f"{title}, {'polygons' if polygons else 'labels'}"] = res
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="project venv: wells -> images + label images (npz)")
    p.add_argument("--data", default="../shared/data/bbbc010")
    p.add_argument("--out", default="/work/bench/s30sd/data.npz")
    for name in ("train", "predict"):
        p = sub.add_parser(name, help=f"StarDist venv: {name}")
        p.add_argument("--npz", default="/work/bench/s30sd/data.npz")
        p.add_argument("--basedir", default="/work/bench/s30sd/models")
        p.add_argument("--name", default="stardist_bbbc010")
        if name == "train":
            p.add_argument("--val", default=VAL, help="training wells kept for validation")
            p.add_argument("--rays", type=int, default=32)
            p.add_argument("--patch", type=int, default=256)
            p.add_argument("--batch", type=int, default=4)
            p.add_argument("--epochs", type=int, default=60)
            p.add_argument("--steps", type=int, default=30)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--out", default="/work/bench/s30sd/pred.npz")
            p.add_argument(
                "--prob-thresh", type=float, default=None, help="default: the optimised one"
            )
            p.add_argument(
                "--nms-thresh", type=float, default=None, help="default: the optimised one"
            )
    p = sub.add_parser("score", help="project venv: score with our evaluation")
    p.add_argument("--pred", default="/work/bench/s30sd/pred.npz")
    p.add_argument("--data", default="../shared/data/bbbc010")
    p.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    {"prepare": prepare, "train": train, "predict": predict, "score": score}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
