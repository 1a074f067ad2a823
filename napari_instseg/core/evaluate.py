"""Accuracy of predicted instances against ground truth (overlapping masks kept).

Two families, as in design.md:

- COCO mask AP, AP50, AP75 (pycocotools; one category; every predicted mask RLE-encoded with
  its score; overlaps kept): comparable with Novotny et al. 2018 on BBBC010.
- DSB-style accuracy ``S(t) = TP / (TP + FP + FN)`` per image at IoU thresholds
  t = 0.5 ... 0.9, one-to-one matching, averaged over images, and ``avS`` = mean over t:
  comparable with PatchPerPix. Matching per threshold is a linear assignment
  (:func:`scipy.optimize.linear_sum_assignment`) that maximises the number of pairs with
  IoU >= t, ties broken by IoU (the same rule as ``stardist.matching``); a pair counts only
  when its IoU >= t.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .types import Instances

__all__ = [
    "ANCHORS",
    "ANCHORS_HEADER",
    "DSB_THRESHOLDS",
    "coco_ap",
    "dsb_accuracy",
    "evaluate",
    "format_table",
    "iou_matrix",
    "parse_wells",
    "to_json",
]

DSB_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)

#: Published BBBC010 results (test half) to print beside ours; None = not reported.
ANCHORS: dict[str, dict[str, float | None]] = {
    "Novotny et al. 2018 (semi-conv)": {"AP": 0.569, "AP50": 0.885, "AP75": 0.661},
    "Mask R-CNN (from Novotny et al.)": {"AP": 0.559, "AP50": 0.865, "AP75": 0.641},
    "PatchPerPix (Hirsch et al. 2020)": {"avS": 0.816, "S0.5": 0.960},
}
#: The line :func:`format_table` prints above the anchors.
ANCHORS_HEADER = (
    "published results on the BBBC010 test half (wells C03-E04), for reference only; "
    "not comparable with results on other images:"
)


def _masks_of(item: object, what: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, H, W) bool masks and scores (or None) of Instances, Sample, masks or labels."""
    scores = None
    if isinstance(item, Instances):
        return item.masks, np.asarray(item.scores, np.float64)
    if hasattr(item, "masks") and not isinstance(item, np.ndarray):  # Sample
        masks = np.asarray(item.masks)
    else:
        masks = np.asarray(item)
    if masks.ndim == 2:  # label image
        if masks.dtype == bool:
            raise ValueError(
                f"{what}[{index}] is a 2D boolean array: pass (N, H, W) masks or a label image"
            )
        masks = Instances.from_labels(masks).masks
    if masks.ndim != 3:
        raise ValueError(f"{what}[{index}] must be (N, H, W) masks, got shape {masks.shape}")
    return masks.astype(bool), scores


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of every predicted mask with every ground-truth mask.

    Parameters
    ----------
    pred : np.ndarray
        (P, H, W) bool.
    gt : np.ndarray
        (G, H, W) bool.

    Returns
    -------
    np.ndarray
        (P, G) float64 IoU.
    """
    p, g = len(pred), len(gt)
    if p == 0 or g == 0:
        return np.zeros((p, g))
    pf = pred.reshape(p, -1)
    gf = gt.reshape(g, -1)
    cols = np.flatnonzero(pf.any(axis=0) | gf.any(axis=0))
    pf = pf[:, cols].astype(np.float32)
    gf = gf[:, cols].astype(np.float32)
    inter = (pf @ gf.T).astype(np.float64)
    union = pf.sum(1)[:, None] + gf.sum(1)[None] - inter
    return inter / np.maximum(union, 1.0)


def _match_count(iou: np.ndarray, thresh: float) -> int:
    """One-to-one matches with IoU >= thresh (max count, ties by IoU)."""
    if iou.size == 0:
        return 0
    n = min(iou.shape)
    costs = -(iou >= thresh).astype(np.float64) - iou / (2.0 * n)
    rows, cols = linear_sum_assignment(costs)
    return int((iou[rows, cols] >= thresh).sum())


def dsb_accuracy(
    ious: Sequence[np.ndarray],
    n_pred: Sequence[int],
    n_gt: Sequence[int],
    thresholds: Sequence[float] = DSB_THRESHOLDS,
) -> dict[str, object]:
    """DSB accuracy per threshold from per-image IoU matrices.

    Parameters
    ----------
    ious : sequence of np.ndarray
        Per image (P, G) IoU.
    n_pred, n_gt : sequence of int
        Per image numbers of predictions and ground-truth instances.
    thresholds : sequence of float
        IoU thresholds.

    Returns
    -------
    dict
        ``"S"``: {threshold: mean accuracy over images}, ``"avS"``, ``"per_image"``:
        list of per-image accuracy lists, ``"tp"``, ``"fp"``, ``"fn"``: totals at each
        threshold.
    """
    per_image = []
    tot = {k: np.zeros(len(thresholds), np.int64) for k in ("tp", "fp", "fn")}
    for iou, p, g in zip(ious, n_pred, n_gt, strict=True):
        acc = []
        for j, t in enumerate(thresholds):
            tp = _match_count(iou, t)
            fp, fn = p - tp, g - tp
            tot["tp"][j] += tp
            tot["fp"][j] += fp
            tot["fn"][j] += fn
            denom = tp + fp + fn
            acc.append(1.0 if denom == 0 else tp / denom)
        per_image.append(acc)
    arr = np.asarray(per_image, np.float64).reshape(-1, len(thresholds))
    mean = arr.mean(axis=0) if len(arr) else np.full(len(thresholds), np.nan)
    return {
        "S": {f"{t:g}": float(v) for t, v in zip(thresholds, mean, strict=True)},
        "avS": float(mean.mean()),
        "per_image": arr.tolist(),
        **{k: v.tolist() for k, v in tot.items()},
    }


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _bbox(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]


def coco_ap(
    pred_masks: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_masks: Sequence[np.ndarray],
) -> dict[str, float]:
    """COCO mask AP, AP50, AP75 with pycocotools (one category, overlaps kept).

    Parameters
    ----------
    pred_masks : sequence of np.ndarray
        Per image (P, H, W) bool predicted masks.
    pred_scores : sequence of np.ndarray
        Per image (P,) scores.
    gt_masks : sequence of np.ndarray
        Per image (G, H, W) bool ground truth.

    Returns
    -------
    dict
        ``AP`` (IoU 0.5:0.95), ``AP50``, ``AP75``; NaN when there is no ground truth,
        0 when there are no predictions.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    ann_id = 1
    for i, (pm, ps, gm) in enumerate(zip(pred_masks, pred_scores, gt_masks, strict=True)):
        h, w = gm.shape[1:] if gm.ndim == 3 and len(gm) else pm.shape[1:]
        images.append({"id": i + 1, "height": int(h), "width": int(w)})
        for m in gm:
            area = int(m.sum())
            if area == 0:
                continue
            anns.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": 1,
                    "segmentation": _rle(m),
                    "area": area,
                    "bbox": _bbox(m),
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        for m, s in zip(pm, ps, strict=True):
            if not m.any():
                continue
            dets.append(
                {"image_id": i + 1, "category_id": 1, "segmentation": _rle(m), "score": float(s)}
            )
    if not anns:
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if not dets:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": 1, "name": "worm"}],
        }
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="segm")
        # every prediction counts (COCO's default keeps an image's 100 best); read the
        # precision table at that limit rather than ``summarize()``, whose AP (IoU
        # 0.5:0.95) looks for a limit of exactly 100 and reports -1 without one
        ev.params.maxDets = [1, 10, max(100, max(len(p) for p in pred_masks))]
        ev.evaluate()
        ev.accumulate()
    # (T IoU thresholds, R recalls, K categories, A area ranges, M limits): area "all"
    precision = ev.eval["precision"][:, :, 0, 0, -1]
    thresholds = np.asarray(ev.params.iouThrs)

    def mean_precision(rows: np.ndarray) -> float:
        values = rows[rows > -1]
        return float(values.mean()) if values.size else 0.0

    return {
        "AP": mean_precision(precision),
        "AP50": mean_precision(precision[np.isclose(thresholds, 0.5)]),
        "AP75": mean_precision(precision[np.isclose(thresholds, 0.75)]),
    }


def evaluate(
    predictions: Sequence[Instances | np.ndarray],
    ground_truth: Sequence[object],
    thresholds: Sequence[float] = DSB_THRESHOLDS,
    names: Sequence[str] | None = None,
) -> dict[str, object]:
    """COCO mask AP and DSB accuracy of predicted instances.

    Parameters
    ----------
    predictions : sequence of Instances or np.ndarray
        Per image: :class:`Instances` (their scores rank them for AP), (N, H, W) masks or
        an (H, W) label image (score 1 each).
    ground_truth : sequence
        Per image: (N, H, W) bool masks (overlaps allowed), :class:`Instances`, a
        :class:`~napari_instseg.core.types.Sample` or an (H, W) label image.
    thresholds : sequence of float
        IoU thresholds of the DSB accuracy.
    names : sequence of str, optional
        Image names reported with the per-image accuracies.

    Returns
    -------
    dict
        ``AP``, ``AP50``, ``AP75``, ``S`` ({"0.5": ..., ...}), ``avS``, ``n_images``,
        ``n_pred``, ``n_gt``, ``tp``/``fp``/``fn`` per threshold, ``per_image``
        ({name: [S(t) ...]}).

    Raises
    ------
    ValueError
        When the numbers of images or the image sizes of a pair differ, or for IoU
        thresholds outside (0, 1].
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(
            f"{len(predictions)} predictions but {len(ground_truth)} ground-truth images"
        )
    bad = [t for t in thresholds if not 0 < t <= 1]
    if bad or not len(thresholds):
        raise ValueError(f"IoU thresholds must be in (0, 1], got {list(thresholds)}")
    names = [str(i) for i in range(len(predictions))] if names is None else list(names)
    pm_all, ps_all, gm_all, ious = [], [], [], []
    for i, (p, g) in enumerate(zip(predictions, ground_truth, strict=True)):
        pm, ps = _masks_of(p, "predictions", i)
        gm, _ = _masks_of(g, "ground_truth", i)
        if pm.shape[1:] != gm.shape[1:]:  # (0, H, W) says its size too
            raise ValueError(
                f"image {names[i]!r}: predicted masks are {pm.shape[1:]} but the ground truth "
                f"is {gm.shape[1:]}"
            )
        ps = np.ones(len(pm)) if ps is None else ps
        pm_all.append(pm)
        ps_all.append(ps)
        gm_all.append(gm)
        ious.append(iou_matrix(pm, gm))
    n_pred = [len(p) for p in pm_all]
    n_gt = [len(g) for g in gm_all]
    dsb = dsb_accuracy(ious, n_pred, n_gt, thresholds)
    ap = coco_ap(pm_all, ps_all, gm_all) if pm_all else {"AP": float("nan")}
    per_image = dict(zip(names, dsb.pop("per_image"), strict=True))
    return {
        **ap,
        **dsb,
        "n_images": len(pm_all),
        "n_pred": int(sum(n_pred)),
        "n_gt": int(sum(n_gt)),
        "per_image": per_image,
    }


def format_table(
    results: dict[str, dict[str, object]] | dict[str, object], anchors: bool = True
) -> str:
    """A plain-text table of our results, then the published BBBC010 anchors.

    The anchors come after a header line (:data:`ANCHORS_HEADER`) saying that they are
    published numbers on the BBBC010 test half, not comparable with results on other images.

    Parameters
    ----------
    results : dict
        One :func:`evaluate` result, or {row name: result} for several.
    anchors : bool
        Add the published anchors (for BBBC010 results; False for other images).

    Returns
    -------
    str
        Columns AP, AP50, AP75, avS, S0.5 ... S0.9; "-" where not reported.
    """
    rows: dict[str, dict[str, object]]
    rows = {"ours": results} if "avS" in results or "AP" in results else dict(results)  # type: ignore[arg-type]
    cols = ["AP", "AP50", "AP75", "avS"] + [f"S{t:g}" for t in DSB_THRESHOLDS]

    def cell(res: dict[str, object], col: str) -> str:
        if col.startswith("S") and col != "S" and isinstance(res.get("S"), dict):
            v = res["S"].get(col[1:])  # type: ignore[union-attr]
        else:
            v = res.get(col)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        return f"{float(v):.3f}"

    width = max(len(k) for k in {**rows, **ANCHORS}) + 2
    lines = ["".ljust(width) + "".join(c.rjust(7) for c in cols)]
    for name, res in rows.items():
        lines.append(name.ljust(width) + "".join(cell(res, c).rjust(7) for c in cols))  # type: ignore[arg-type]
    if not anchors:
        return "\n".join(lines)
    lines.append(ANCHORS_HEADER)
    for name, res in ANCHORS.items():
        lines.append(name.ljust(width) + "".join(cell(res, c).rjust(7) for c in cols))  # type: ignore[arg-type]
    return "\n".join(lines)


def to_json(results: dict[str, object]) -> str:
    """JSON text of an :func:`evaluate` result (NaN written as null)."""

    def clean(x: object) -> object:
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, float | np.floating):
            return None if np.isnan(x) else float(x)
        if isinstance(x, np.integer):
            return int(x)
        return x

    return json.dumps(clean(results), indent=2)


_WELL = re.compile(r"^([A-Pa-p])(\d{1,2})$")


def parse_wells(spec: str, n_cols: int = 24) -> list[str]:
    """Expand a well specification such as ``"A01-B12"`` or ``"A01,A03,B13-C02"``.

    Ranges run in plate reading order (A01 ... A24, B01, ...) with ``n_cols`` columns
    (24 on a 384-well plate such as BBBC010's).

    Parameters
    ----------
    spec : str
        Comma-separated wells and ``FIRST-LAST`` ranges.
    n_cols : int
        Columns per plate row.

    Returns
    -------
    list of str
        Wells as ``"B07"``, in the given order without duplicates.
    """

    def index(well: str) -> int:
        m = _WELL.match(well.strip())
        if not m:
            raise ValueError(f"bad well name {well!r} in {spec!r} (expected e.g. 'A01')")
        col = int(m[2])
        if not 1 <= col <= n_cols:
            raise ValueError(f"well {well!r} in {spec!r}: column must be 1..{n_cols}")
        return (ord(m[1].upper()) - ord("A")) * n_cols + col - 1

    def name(i: int) -> str:
        return f"{chr(ord('A') + i // n_cols)}{i % n_cols + 1:02d}"

    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            ia, ib = index(a), index(b)
            if ib < ia:
                raise ValueError(f"well range {part!r} runs backwards")
            wells = [name(i) for i in range(ia, ib + 1)]
        else:
            wells = [name(index(part))]
        out.extend(w for w in wells if w not in out)
    if not out:
        raise ValueError(f"no wells in {spec!r}")
    return out


_WELL_RANGE = re.compile(r"[A-Za-z]+\d+\s*-\s*[A-Za-z]+\d+")


def parse_names(spec: str) -> list[str]:
    """Expand ``"A01-B12,C01,img7"`` into image names.

    Parameters
    ----------
    spec : str
        Comma-separated names; a part like ``A01-B12`` is a range of wells in plate order
        (A01..A24, B01, ...; see :func:`parse_wells`), any other part is taken as an image
        name as it is (e.g. a training-folder image such as ``synthetic-5``).

    Returns
    -------
    list of str
        The names, in order.
    """
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if _WELL_RANGE.fullmatch(part):
            out.extend(parse_wells(part))
        elif part:
            out.append(part)
    return out
