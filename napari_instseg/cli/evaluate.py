"""``napari-instseg evaluate``: COCO mask AP and DSB accuracy against ground truth.

Examples
--------
Compare predictions with ground truth (a BBBC010 folder or a training folder), matching
images by name (a BBBC010 file name by its well). ``--pred`` is a training folder (exported
from the plugin: overlaps kept) or ``napari-instseg predict``'s output folder
(``<name>_labels.tif``, scores from ``<name>_measurements.csv``; label images hold no
overlaps, so crossing worms lose their shared pixels there)::

    napari-instseg predict images/*_w2_*.tif --out results/
    napari-instseg evaluate --pred results/ --gt ../shared/data/bbbc010 --json out.json

Predict and segment BBBC010 validation wells with a model, then evaluate::

    napari-instseg evaluate --model default --gt ../shared/data/bbbc010 --wells B13-C02

A model trained with ``napari-instseg train`` has no segmentation parameters of its own:
choose them on its validation images and store them in its weights, so that
``segment(method="auto")``, ``predict``, ``batch`` and the plugin use them::

    napari-instseg evaluate --model runs/mine/best.safetensors --gt ../shared/data/bbbc010 \
        --wells A11-A12,B11-B12,C01-C02,B13-B24 --tta 8 --tune --write

Scores on the images the parameters were tuned on are optimistic; ``--cross-validate 2``
also scores the search itself (each half segmented with parameters tuned on the other
half), which is closer to what new images will give.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.evaluate import evaluate, format_table, parse_names, to_json
from ..core.types import Instances, Sample
from .predict import SCALE_HELP, scale_arg, tta_arg

if TYPE_CHECKING:
    from ..core.model import InstSegNet


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments."""
    parser.add_argument("--gt", required=True, help="ground truth: training folder or BBBC010")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--pred",
        help="predicted instances: a training folder, or the output folder of "
        "`napari-instseg predict` (*_labels.tif)",
    )
    src.add_argument(
        "--model",
        help="predict + segment the ground truth's images with this model "
        "('default' = shipped weights)",
    )
    parser.add_argument(
        "--wells",
        help="BBBC010 wells or training-folder image names, e.g. B13-C02, A01,A05-A08 or "
        "synthetic-5,synthetic-6",
    )
    parser.add_argument(
        "--method",
        default="auto",
        choices=("auto", "seeds", "boundary", "hybrid"),
        help="segmentation method with --model (default auto: the model's recommended method "
        "with its tuned parameters)",
    )
    parser.add_argument(
        "--tta",
        type=tta_arg,
        default="auto",
        help="test-time augmentation passes with --model: 1, 2, 4 or 8 (default auto: what "
        "the model's parameters were tuned with)",
    )
    parser.add_argument("--scale", type=scale_arg, default=1.0, help=f"with --model: {SCALE_HELP}")
    parser.add_argument("--device", default="auto", help="device for --model (auto|cpu|cuda|mps)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="with --model: first choose the segmentation method's parameters on these "
        "images (coordinate search for the best COCO AP; --method auto tunes the model's "
        "recommended method, else boundary), then score with them. A model you trained "
        "yourself has none until it is tuned: tune it on its validation images",
    )
    parser.add_argument(
        "--cross-validate",
        type=int,
        metavar="K",
        help="with --tune: also score the search by K-fold cross-validation (every image "
        "segmented with parameters tuned on the other folds' images): closer to what new "
        "images will give than the scores on the images it was tuned on",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="with --tune: store the parameters, the method and the tta in the model's "
        "weights, for segment(method='auto'), predict, batch and the plugin",
    )


def is_bbbc010(root: Path) -> bool:
    """Whether ``root`` looks like a BBBC010 folder (``images/`` with w2 TIFFs, ``masks/``)."""
    from ..core.io import bbbc010_wells

    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        return False
    try:
        return bool(bbbc010_wells(root))
    except FileNotFoundError:
        return False


def load_samples(root: str | Path, wells: list[str] | None = None) -> list[Sample]:
    """Read a BBBC010 folder or a training folder into samples.

    Parameters
    ----------
    root : str or Path
        The folder.
    wells : list of str, optional
        BBBC010 wells (or sample names of a training folder) to keep.

    Returns
    -------
    list of Sample
        In the folder's order.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if is_bbbc010(root):
        from ..core.io import read_bbbc010

        return read_bbbc010(root, wells=wells)
    if not (root / "manifest.json").exists() and any(root.glob(f"*{LABELS_SUFFIX}")):
        samples = read_prediction_folder(root)
        if wells is not None:
            samples = [s for s in samples if s.name in set(wells)]
        return samples
    try:
        from ..core.training_folder import read_training_folder
    except ImportError as err:  # pragma: no cover - lands with the export work
        raise ValueError(
            f"{root} is not a BBBC010 folder and training folders cannot be read yet "
            "(napari_instseg.core.training_folder is missing)"
        ) from err
    samples = list(read_training_folder(root))
    if wells is not None:
        keep = set(wells)
        samples = [s for s in samples if s.name in keep]
    return samples


LABELS_SUFFIX = "_labels.tif"
_WELL = re.compile(r"_(?P<well>[A-P]\d{2})_w2_")


def read_prediction_folder(root: str | Path) -> list[Sample]:
    """The instances ``napari-instseg predict`` wrote into a folder.

    Parameters
    ----------
    root : str or Path
        The ``--out`` folder of ``predict``: ``<name>_labels.tif`` per image (2D), and
        ``<name>_measurements.csv`` with each label's ``score`` when it was written.

    Returns
    -------
    list of Sample
        One per labels file, named after the BBBC010 well in the file name when there is
        one (``..._A01_w2_...`` -> ``A01``), else ``<name>``; the scores in
        ``metadata["scores"]`` (None without the table). The image is a placeholder of
        zeros: evaluation needs only the masks.

    Raises
    ------
    ValueError
        For a labels file that is not one 2D label image.
    """
    import numpy as np
    import pandas as pd
    import tifffile

    root = Path(root)
    samples = []
    for path in sorted(root.glob(f"*{LABELS_SUFFIX}")):
        name = path.name[: -len(LABELS_SUFFIX)]
        labels = np.asarray(tifffile.imread(path))
        if labels.ndim != 2:
            raise ValueError(
                f"{path}: {labels.ndim}D labels; evaluate reads one 2D label image per file"
            )
        ids = np.unique(labels)
        ids = ids[ids > 0]
        masks = labels[None] == ids[:, None, None]
        scores = None
        table = root / f"{name}_measurements.csv"
        if table.is_file():
            rows = pd.read_csv(table)
            if {"label", "score"} <= set(rows.columns):
                by_label = dict(zip(rows["label"], rows["score"], strict=True))
                if all(int(i) in by_label for i in ids):
                    scores = np.array([by_label[int(i)] for i in ids], np.float32)
        well = _WELL.search(name + "_")
        samples.append(
            Sample(
                image=np.zeros(labels.shape, np.float32),
                masks=masks,
                name=well["well"] if well else name,
                metadata={"scores": scores},
            )
        )
    return samples


def _as_instances(sample: Sample) -> Instances:
    scores = sample.metadata.get("scores") if sample.metadata else None
    if scores is not None and len(scores) != sample.n_instances:
        scores = None
    return Instances(masks=sample.masks, scores=scores, classes=sample.classes)


def _predict_all(
    args: argparse.Namespace, samples: list[Sample]
) -> tuple[list[Instances], dict | None]:
    try:
        from ..core.predict import predict
        from ..core.weights import load_model
    except ImportError as err:
        raise ValueError(
            "--model needs napari_instseg.core.predict and core.weights, which are not "
            f"available yet ({err})"
        ) from err
    from ..core.instances import segment

    model = load_model(None if args.model == "default" else args.model)
    if args.tune:
        return _tune_and_segment(args, model, samples)
    out = []
    for s in samples:
        prediction = predict(
            s.image, model=model, device=args.device, tta=args.tta, scale=args.scale
        )
        out.append(segment(prediction, method=args.method))
        print(f"  {s.name}: {len(out[-1])} instances", flush=True)
    return out, None


def _tune_and_segment(
    args: argparse.Namespace, model: InstSegNet, samples: list[Sample]
) -> tuple[list[Instances], dict | None]:
    """``--tune``: predict every image, tune the method on them, segment with the result.

    Returns the instances and, with ``--cross-validate``, the out-of-fold scores.
    """
    from ..core.instances import segment
    from ..core.predict import predict
    from ..core.tune import cross_validate_tuning, tune_segmentation, write_tuning

    predictions = []
    for s in samples:
        predictions.append(
            predict(s.image, model=model, device=args.device, tta=args.tta, scale=args.scale)
        )
        print(f"  {s.name}: predicted", flush=True)
    stored = dict(model.metadata.get("segment_params") or {})
    method = args.method
    if method == "auto":
        method = str(model.metadata.get("recommended_method") or "boundary")
    print(f"tuning {method} on {len(samples)} images (COCO AP)...", flush=True)
    t0 = time.perf_counter()
    tuned = tune_segmentation(
        predictions, [s.masks for s in samples], methods=[method], starts=[stored]
    )
    print(
        f"tuned in {time.perf_counter() - t0:.0f} s ({tuned.trials} evaluations): "
        f"{method} {tuned.params[method]}"
    )
    print("the scores below are on the images it was tuned on: expect less on new ones")
    if args.write:
        tta = int(predictions[0].metadata.get("tta", 1))
        names = args.wells or ",".join(s.name for s in samples)
        write_tuning(args.model, tuned, images=names, tta=tta)
        print(f"wrote the parameters into {args.model} (recommended tta {tta})")
    cross_validated = None
    if args.cross_validate:
        k = args.cross_validate
        print(f"{k}-fold cross-validation of the search...", flush=True)
        t0 = time.perf_counter()
        cv = cross_validate_tuning(
            predictions,
            [s.masks for s in samples],
            n_folds=k,
            method=method,
            starts=[stored],
            names=[s.name for s in samples],
        )
        print(f"cross-validated in {time.perf_counter() - t0:.0f} s ({cv.trials} evaluations)")
        cross_validated = {
            **cv.scores,
            "folds": [[samples[i].name for i in fold] for fold in cv.folds],
            "fold_params": cv.params,
        }
    found = [segment(p, method=method, **tuned.params[method]) for p in predictions]
    return found, cross_validated


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table (and write JSON when asked)."""
    wells = parse_names(args.wells) if args.wells else None
    if args.tune and not args.model:
        raise ValueError("--tune needs --model: the parameters are chosen on its predictions")
    if args.write and not args.tune:
        raise ValueError("--write stores what --tune chose: give --tune as well")
    if args.cross_validate is not None and not args.tune:
        raise ValueError("--cross-validate scores the parameter search: give --tune as well")
    if args.cross_validate is not None and args.cross_validate < 2:
        raise ValueError(f"--cross-validate needs 2 folds or more, got {args.cross_validate}")
    if args.write and args.model == "default":
        raise ValueError(
            "--write would change the shipped weights; copy them (and their .json) to a file "
            "of yours and give that to --model"
        )
    if args.json is not None and args.json.is_dir():
        raise ValueError(f"--json {args.json} is a folder; give a file name, e.g. out.json")
    t0 = time.perf_counter()
    gt = load_samples(args.gt, wells)
    if not gt:
        named = f" named by --wells {args.wells}" if wells else ""
        raise ValueError(f"no ground-truth images{named} found in {args.gt}")
    if args.cross_validate is not None and args.cross_validate > len(gt):
        raise ValueError(
            f"--cross-validate {args.cross_validate}: more folds than the {len(gt)} images"
        )
    cross_validated = None
    if args.model:
        preds, cross_validated = _predict_all(args, gt)
        names = [s.name for s in gt]
    else:
        pred_samples = {s.name: s for s in load_samples(args.pred)}
        missing = [s.name for s in gt if s.name not in pred_samples]
        if len(missing) == len(gt):
            raise ValueError(
                f"no image names shared by {args.pred} and {args.gt} "
                f"(e.g. ground truth {gt[0].name!r})"
            )
        if missing:
            print(f"warning: no prediction for {len(missing)} images: {', '.join(missing[:10])}")
        gt = [s for s in gt if s.name in pred_samples]
        preds = [_as_instances(pred_samples[s.name]) for s in gt]
        names = [s.name for s in gt]
    results = evaluate(preds, [s.masks for s in gt], names=names)
    results["seconds"] = round(time.perf_counter() - t0, 2)
    print(
        f"{results['n_images']} images, {results['n_gt']} ground-truth instances, "
        f"{results['n_pred']} predicted ({results['seconds']} s)"
    )
    anchors = is_bbbc010(Path(args.gt))  # published BBBC010 numbers: beside BBBC010 only
    if cross_validated is None:
        print(format_table(results, anchors=anchors))
    else:
        results["cross_validated"] = cross_validated
        rows = {
            "tuned on these images": results,
            f"{args.cross_validate}-fold cross-validated": cross_validated,
        }
        print(format_table(rows, anchors=anchors))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(to_json(results))
        print(f"wrote {args.json}")
    return 0
