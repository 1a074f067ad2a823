"""Baseline: cellpose 3 trained from scratch on our BBBC010 training wells, scored by us.

Four steps in two environments: ``export`` and ``score`` run in this project's venv (they
use :mod:`napari_instseg`); ``predict`` runs in a separate venv with ``cellpose<4`` (which
this project does not depend on: nothing here is imported by the tests or CI). Training
uses cellpose's own command line on the exported training folder, exactly as
``docs/data-format.md`` describes. The Session 30 run (docs/benchmarks.md) was::

    B=/work/bench/s30cp
    python3 -m venv $B/venv && $B/venv/bin/pip install torch==2.13.0  # the CPU wheel
    $B/venv/bin/pip install "cellpose<4"  # 3.1.1.3: the classic U-Net

    # 1. our exporter: training wells -> $B/train, held-out wells -> $B/heldout
    #    (and the <name>_masks.tif links cellpose's command line wants)
    .venv/bin/python benchmarks/baseline_cellpose.py export --out $B

    # 2. cellpose from scratch on the 32 training images, one core
    OMP_NUM_THREADS=1 taskset -c 0 $B/venv/bin/python -m cellpose --train \\
        --dir $B/train/images --mask_filter _masks --pretrained_model None \\
        --chan 0 --chan2 0 --diam_mean 30 --n_epochs 50 --save_every 5 \\
        --model_name_out cp_bbbc010 --verbose

    # 3. label images (+ mean cell probability per label) for each diameter tried
    OMP_NUM_THREADS=1 taskset -c 0 $B/venv/bin/python benchmarks/baseline_cellpose.py \\
        predict --model $B/train/images/models/cp_bbbc010 --folder $B/train \\
        --diameters labels,0.8,1.25 --out $B/pred_train
    OMP_NUM_THREADS=1 taskset -c 0 $B/venv/bin/python benchmarks/baseline_cellpose.py \\
        predict --model $B/train/images/models/cp_bbbc010 --folder $B/heldout \\
        --diameters labels --out $B/pred_heldout

    # 4. our COCO AP / DSB accuracy against the per-worm masks (overlaps kept)
    .venv/bin/python benchmarks/baseline_cellpose.py score --pred $B/pred_train \\
        --wells A01-A10,A13-A24,B01-B10
    .venv/bin/python benchmarks/baseline_cellpose.py score --pred $B/pred_heldout \\
        --wells A11-A12,B11-B12,C01-C02,B13-B24 --folder $B/heldout

``--diameters`` takes ``labels`` (the model's ``diam_labels``, the mean diameter of the
training masks) and factors of it; choose among them on the training images only.
A label image cannot hold overlapping worms; each label becomes one instance whose score
is cellpose's mean cell probability (sigmoid) inside it (``--score one`` for 1.0).
``--folder`` adds the exported label images of the truth as a prediction: the best any
label image can score against the overlapping per-worm masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

TRAIN_WELLS = "A01-A10,A13-A24,B01-B10"
HELDOUT_WELLS = "A11-A12,B11-B12,C01-C02,B13-B24"


def _ours():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import napari_instseg.core.evaluate as ev
    import napari_instseg.core.io as io
    import napari_instseg.core.training_folder as tf
    import napari_instseg.core.types as types

    return ev, io, tf, types


def cmd_export(args: argparse.Namespace) -> None:
    """Write the training and held-out wells as training folders, with cellpose links."""
    ev, io, tf, _ = _ours()
    for sub, wells in (("train", args.train_wells), ("heldout", args.heldout_wells)):
        folder = Path(args.out) / sub
        samples = io.read_bbbc010(args.data, ev.parse_names(wells), with_w1=False)
        tf.write_training_folder(folder, samples, overwrite=True)
        # docs/data-format.md: the cellpose command line wants <name>_masks.tif beside images
        for f in sorted((folder / "masks").glob("*.tif")):
            link = folder / "images" / f"{f.stem}_masks.tif"
            if not link.is_symlink():
                link.symlink_to(f"../masks/{f.name}")
        print(f"{folder}: {len(samples)} images")


def cmd_predict(args: argparse.Namespace) -> None:
    """cellpose label images for every image of a folder, per diameter (cellpose venv)."""
    import tifffile
    import torch
    from cellpose import models

    torch.set_num_threads(1)
    model = models.CellposeModel(gpu=False, pretrained_model=args.model)
    diam_labels = float(model.diam_labels)
    print(f"diam_mean {float(model.diam_mean):.1f}, diam_labels {diam_labels:.1f}")
    # the exported names (images/ also holds the _masks links and cellpose's _flows files)
    names = sorted(p.stem for p in Path(args.folder, "masks").glob("*.tif"))
    if args.limit:
        names = names[: args.limit]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = {}
    for spec in args.diameters.split(","):
        diameter = diam_labels if spec == "labels" else float(spec) * diam_labels
        key = "labels" if spec == "labels" else f"x{spec}"
        labels, scores, seconds = {}, {}, []
        for name in names:
            image = tifffile.imread(Path(args.folder, "images", f"{name}.tif"))
            t0 = time.perf_counter()
            masks, flows, _ = model.eval(image, channels=[0, 0], diameter=diameter, normalize=True)
            seconds.append(time.perf_counter() - t0)
            prob = 1.0 / (1.0 + np.exp(-np.asarray(flows[2], np.float64)))
            ids = np.arange(1, int(masks.max()) + 1)
            mean = np.zeros(len(ids))
            if len(ids):
                sums = np.bincount(masks.ravel(), prob.ravel(), len(ids) + 1)[1:]
                counts = np.bincount(masks.ravel(), minlength=len(ids) + 1)[1:]
                mean = sums / np.maximum(counts, 1)
            labels[name] = masks.astype(np.uint16)
            scores[name] = mean
            print(f"{key} {name}: {len(ids)} labels, {seconds[-1]:.2f} s", flush=True)
        np.savez_compressed(out / f"{key}_labels.npz", **labels)
        np.savez_compressed(out / f"{key}_scores.npz", **scores)
        timing[key] = {
            "diameter": diameter,
            "s_per_image_median": float(np.median(seconds)),
            "s_per_image_mean": float(np.mean(seconds)),
        }
        print(key, timing[key], flush=True)
    (out / "timing.json").write_text(json.dumps(timing, indent=1))


def cmd_score(args: argparse.Namespace) -> None:
    """Our COCO AP and DSB accuracy of the saved predictions (this project's venv)."""
    ev, io, _, types = _ours()
    wells = ev.parse_names(args.wells)
    samples = io.read_bbbc010(args.data, wells, with_w1=False)
    results = {}
    for path in sorted(Path(args.pred).glob("*_labels.npz")):
        key = path.name[: -len("_labels.npz")]
        labels = np.load(path)
        scores = np.load(Path(args.pred) / f"{key}_scores.npz")
        preds = []
        for well in wells:
            inst = types.Instances.from_labels(labels[well])
            if args.score == "prob":
                ids = np.unique(labels[well])
                ids = ids[ids > 0]
                # from_labels keeps labels in increasing order; empty labels are dropped
                inst.scores = np.clip(scores[well][ids - 1], 0, 1).astype(np.float32)
                assert len(inst.scores) == len(inst)
            preds.append(inst)
        res = ev.evaluate(preds, [s.masks for s in samples], names=wells)
        res.pop("per_image", None)
        results[f"cellpose d={key}"] = res
    if args.folder:  # the ceiling of any label image: the exported truth itself
        import tifffile

        truth = [tifffile.imread(Path(args.folder, "masks", f"{w}.tif")) for w in wells]
        res = ev.evaluate(truth, [s.masks for s in samples], names=wells)
        res.pop("per_image", None)
        results["label image of the truth"] = res
    print(ev.format_table(results, anchors=False))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("--data", default="../shared/data/bbbc010")
    p.add_argument("--out", required=True)
    p.add_argument("--train-wells", default=TRAIN_WELLS)
    p.add_argument("--heldout-wells", default=HELDOUT_WELLS)
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("predict", help=cmd_predict.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--folder", required=True, help="a training folder from export")
    p.add_argument("--diameters", default="labels", help="'labels' and/or factors of it")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=0, help="only the first N images")
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("score", help=cmd_score.__doc__)
    p.add_argument("--data", default="../shared/data/bbbc010")
    p.add_argument("--pred", required=True)
    p.add_argument("--wells", required=True)
    p.add_argument("--score", choices=["prob", "one"], default="prob")
    p.add_argument("--folder", default=None, help="also score this export's label images")
    p.add_argument("--json", default=None)
    p.set_defaults(fn=cmd_score)
    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
