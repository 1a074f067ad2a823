"""Objects of another size: running the model at the scale it was trained on.

A network sees worms as wide as the ones it was trained on (BBBC010: about 9 px, training
augmentation covers 0.7-1.5x). Images whose worms are much wider or narrower are resized
by a factor ``scale`` before the network sees them (as cellpose's ``diameter`` and
stardist's ``scale`` do); the outputs are resized back, so layers, clicks and labels stay
on the user's pixels. Segmentation, whose parameters are in the model's pixels (sizes,
distances), runs on the maps resized to the model's scale again and its masks are brought
back to the image (:func:`napari_instseg.core.instances.segment` does this when a
prediction carries a scale).

``scale="auto"`` estimates the factor from the model's own foreground: the mean width of
the predicted worms (their area over their skeleton's length) against the width of the
worms the model was trained on (``object_width`` in its metadata).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage
from skimage.morphology import remove_small_holes, skeletonize
from skimage.transform import resize

from .types import Instances, Prediction, Sample

__all__ = [
    "MAX_HOLE",
    "MAX_SCALE",
    "MIN_SCALE",
    "SCALE_TOLERANCE",
    "check_scale",
    "estimate_scale",
    "foreground_width",
    "object_width",
    "resize_image",
    "resize_instances",
    "resize_prediction",
    "scaled_shape",
]

#: Smallest and largest resizing factor accepted (a worm 10x wider or narrower than the
#: model's would not be a worm to it).
MIN_SCALE, MAX_SCALE = 0.1, 10.0
#: ``scale="auto"`` keeps 1 when the estimate is within this factor of it (on BBBC010's
#: own images the estimates lie within 0.89-1.12: a worm's width varies from well to well).
SCALE_TOLERANCE = 1.15
#: Holes in a predicted foreground up to this many pixels are filled before measuring it.
MAX_HOLE = 100


def check_scale(scale: float | str) -> float | str:
    """Validate a resizing factor.

    Parameters
    ----------
    scale : float or "auto"
        Factor in [``MIN_SCALE``, ``MAX_SCALE``], or ``"auto"``.

    Returns
    -------
    float or str
        The factor as a float, or ``"auto"``.

    Raises
    ------
    ValueError
        Anything else.
    """
    if isinstance(scale, str):
        if scale.strip().lower() == "auto":
            return "auto"
        try:
            scale = float(scale)
        except ValueError:
            raise ValueError(f"scale must be a number or 'auto', not {scale!r}") from None
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.integer | np.floating):
        raise ValueError(f"scale must be a number or 'auto', not {scale!r}")
    value = float(scale)
    if not (math.isfinite(value) and MIN_SCALE <= value <= MAX_SCALE):
        raise ValueError(f"scale must be in [{MIN_SCALE}, {MAX_SCALE}] or 'auto', not {scale!r}")
    return value


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """(H, W) of an image of ``shape`` resized by ``scale`` (rounded, at least 1)."""
    return tuple(max(1, round(n * scale)) for n in shape)  # type: ignore[return-value]


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize a (C, H, W) image by ``scale`` (bilinear, anti-aliased when shrinking).

    Parameters
    ----------
    image : np.ndarray
        (C, H, W) intensities.
    scale : float
        Resizing factor.

    Returns
    -------
    np.ndarray
        (C, h, w) float32 with (h, w) = :func:`scaled_shape`.
    """
    image = np.asarray(image, np.float32)
    shape = scaled_shape(image.shape[-2:], scale)
    return resize(
        image, image.shape[:-2] + shape, order=1, preserve_range=True, anti_aliasing=scale < 1
    ).astype(np.float32)


def _resize_maps(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    array = np.asarray(array, np.float32)
    if array.shape[-2:] == tuple(shape):
        return array
    shrink = shape[0] < array.shape[-2] or shape[1] < array.shape[-1]
    out = resize(
        array, array.shape[:-2] + tuple(shape), order=1, preserve_range=True, anti_aliasing=shrink
    )
    return out.astype(np.float32)


def resize_prediction(prediction: Prediction, shape: tuple[int, int]) -> Prediction:
    """Every map of a prediction resized (bilinear) to ``shape``.

    Parameters
    ----------
    prediction : Prediction
        The outputs to resize.
    shape : tuple of int
        Target (H, W).

    Returns
    -------
    Prediction
        A new prediction (metadata copied).
    """
    return dataclasses.replace(
        prediction,
        embeddings=_resize_maps(prediction.embeddings, shape),
        seediness=_resize_maps(prediction.seediness, shape),
        class_scores=_resize_maps(prediction.class_scores, shape),
        boundary=_resize_maps(prediction.boundary, shape),
        foreground=_resize_maps(prediction.foreground, shape),
        contrast=None if prediction.contrast is None else _resize_maps(prediction.contrast, shape),
        metadata=dict(prediction.metadata),
        model_grid=None,
    )


def at_model_scale(prediction: Prediction) -> Prediction:
    """A prediction made at another scale, on the grid the network ran on.

    Parameters
    ----------
    prediction : Prediction
        Outputs on the image's grid; ``metadata["scale"]`` is the factor the image was
        resized by for the network (absent or 1: returned as it is).

    Returns
    -------
    Prediction
        Its ``model_grid`` (the network's own maps, kept by
        :func:`~napari_instseg.core.predict.predict`) when it has one of the right shape,
        else its maps resized to :func:`scaled_shape`; ``metadata`` is the prediction's
        with ``scale`` 1.
    """
    scale = float(prediction.metadata.get("scale") or 1.0)
    if scale == 1.0:
        return prediction
    shape = scaled_shape(prediction.shape, scale)
    metadata = {**prediction.metadata, "scale": 1.0}
    grid = prediction.model_grid
    if grid is None or grid.shape != shape:
        return dataclasses.replace(resize_prediction(prediction, shape), metadata=metadata)
    # the kept object itself (brought in step with the prediction), so that what is cached
    # per prediction object (a Grower between clicks) is reused; outlines are refined on
    # the image's grid, so its contrast is not needed here
    grid.metadata = metadata
    return grid


def move_points(points: np.ndarray, shape: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(K, 2) pixels of an image of ``shape`` moved to a resized ``grid`` (pixel centres)."""
    factor = np.array(grid, np.float64) / np.array(shape, np.float64)
    moved = np.floor((np.asarray(points, np.float64).reshape(-1, 2) + 0.5) * factor)
    return np.minimum(moved.astype(np.int64), np.array(grid) - 1)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``shape``: bilinear, kept where >= 0.5, only around the mask.

    Parameters
    ----------
    mask : np.ndarray
        (h, w) bool.
    shape : tuple of int
        Target (H, W).

    Returns
    -------
    np.ndarray
        (H, W) bool. Pixel centres map as in ``skimage.transform.resize``; only the
        target pixels within one source pixel of the mask's bounding box are computed, so
        a small mask on a large image costs little (a click).
    """
    mask = np.asarray(mask, bool)
    out = np.zeros(shape, bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(mask.any(axis=0))
    boxes = []
    for first, last, n_src, n_dst in (
        (rows[0], rows[-1], mask.shape[0], shape[0]),
        (cols[0], cols[-1], mask.shape[1], shape[1]),
    ):
        step = n_src / n_dst  # source pixels per target pixel
        lo = max(0, math.floor((first - 1 + 0.5) / step - 0.5))
        hi = min(n_dst, math.ceil((last + 1 + 0.5) / step - 0.5) + 1)
        src_lo, src_hi = max(0, first - 2), min(n_src, last + 3)
        coords = np.clip((np.arange(lo, hi) + 0.5) * step - 0.5, 0, n_src - 1) - src_lo
        boxes.append((lo, hi, src_lo, src_hi, coords))
    (r0, r1, sr0, sr1, ry), (c0, c1, sc0, sc1, cx) = boxes
    crop = mask[sr0:sr1, sc0:sc1].astype(np.float32)
    grid_r, grid_c = np.meshgrid(ry, cx, indexing="ij")
    values = ndimage.map_coordinates(crop, [grid_r, grid_c], order=1, mode="nearest")
    out[r0:r1, c0:c1] = values >= 0.5
    return out


def resize_instances(instances: Instances, shape: tuple[int, int]) -> Instances:
    """Instances resized to ``shape``: each mask bilinearly, kept where >= 0.5.

    Parameters
    ----------
    instances : Instances
        Masks (N, h, w) and per-instance values.
    shape : tuple of int
        Target (H, W).

    Returns
    -------
    Instances
        Masks (N, H, W); scores, classes and taus kept; seeds moved to the new grid.
    """
    h, w = instances.shape
    H, W = shape
    if (h, w) == (H, W):
        return instances
    masks = np.zeros((len(instances.masks), H, W), bool)
    for i, mask in enumerate(instances.masks):
        masks[i] = resize_mask(mask, (H, W))
    seeds = instances.seeds
    if seeds is not None:
        seeds = move_points(seeds, (h, w), (H, W))
    return dataclasses.replace(instances, masks=masks, seeds=seeds)


def object_width(masks: np.ndarray) -> float:
    """Mean width of the objects in an image: their area over their skeleton's length.

    The skeleton's length counts each link between skeleton pixels once, diagonal ones as
    sqrt(2) (so a worm resized by a factor measures that factor wider: within 2 % for
    0.6-1.6x on BBBC010's annotations). Crossing or touching objects count together.

    Parameters
    ----------
    masks : np.ndarray
        (N, H, W) bool instance masks (their union is measured) or an (H, W) bool
        foreground.

    Returns
    -------
    float
        Width in pixels; NaN without any object.
    """
    masks = np.asarray(masks, bool)
    fg = masks.any(axis=0) if masks.ndim == 3 else masks
    skeleton = skeletonize(fg).astype(np.uint8)
    straight = (skeleton[1:, :] & skeleton[:-1, :]).sum() + (
        skeleton[:, 1:] & skeleton[:, :-1]
    ).sum()
    diagonal = (skeleton[1:, 1:] & skeleton[:-1, :-1]).sum() + (
        skeleton[1:, :-1] & skeleton[:-1, 1:]
    ).sum()
    length = float(straight) + math.sqrt(2.0) * float(diagonal)
    if length <= 0:
        return float("nan")
    return float(fg.sum()) / length


def foreground_width(prediction: Prediction, threshold: float = 0.5) -> float:
    """Mean width of the predicted foreground (see :func:`object_width`).

    The foreground of objects much wider than the model's is ragged (holes, frayed
    edges), which lengthens its skeleton, so holes under :data:`MAX_HOLE` pixels are
    filled and a one-pixel opening smooths it first.

    Parameters
    ----------
    prediction : Prediction
        Model outputs.
    threshold : float
        Foreground probability above which a pixel is foreground (default 0.5).

    Returns
    -------
    float
        The width in the prediction's pixels; NaN when nothing is foreground.
    """
    fg = np.asarray(prediction.foreground) > threshold
    fg = remove_small_holes(fg, max_size=MAX_HOLE)
    return object_width(ndimage.binary_opening(fg))


def estimate_scale(prediction: Prediction, reference_width: float) -> float | None:
    """The resizing factor that brings the predicted worms to ``reference_width``.

    Parameters
    ----------
    prediction : Prediction
        Outputs of a pass at any scale, with its maps on the image's pixels (as
        :func:`napari_instseg.core.predict.predict` returns them).
    reference_width : float
        Width of the model's training objects, in pixels.

    Returns
    -------
    float or None
        The factor for the image, within [``MIN_SCALE``, ``MAX_SCALE``]; None when the
        prediction shows no foreground to measure.
    """
    width = foreground_width(prediction)
    if not math.isfinite(width) or width <= 0:
        return None
    return float(np.clip(reference_width / width, MIN_SCALE, MAX_SCALE))


def resize_sample(sample: Sample, scale: float) -> Sample:
    """A training sample resized by ``scale``: image and channels bilinear, masks >= 0.5.

    Parameters
    ----------
    sample : Sample
        Image, masks and per-instance flags.
    scale : float
        Resizing factor (see :func:`check_scale`).

    Returns
    -------
    Sample
        The resized sample; instances that vanish (smaller than a pixel after shrinking)
        are dropped with their ``reviewed`` and ``classes`` entries; ``metadata["scale"]``
        becomes 1 and ``metadata["resized_by"]`` records the factor.
    """
    scale = check_scale(scale)
    if scale == "auto":
        raise ValueError("a training sample needs a numeric scale, not 'auto'")
    image = np.asarray(sample.image, np.float32)
    resized = resize_image(image if image.ndim == 3 else image[None], scale)
    masks = resize_instances(Instances(masks=sample.masks), resized.shape[-2:]).masks
    keep = masks.any(axis=(1, 2))
    return dataclasses.replace(
        sample,
        image=resized if image.ndim == 3 else resized[0],
        masks=masks[keep],
        channels={
            k: resize_image(np.asarray(v)[None], scale)[0] for k, v in sample.channels.items()
        },
        reviewed=None if sample.reviewed is None else np.asarray(sample.reviewed)[keep],
        classes=None if sample.classes is None else np.asarray(sample.classes)[keep],
        metadata={**sample.metadata, "scale": 1.0, "resized_by": scale},
    )


def at_recorded_scale(sample: Sample) -> Sample:
    """A sample resized by the scale its metadata records (``metadata["scale"]``).

    Labels corrected on a prediction made at another scale are exported with that scale
    (the plugin records it), so that training sees the objects at the model's width and a
    fine-tuned model keeps the parent's ``object_width``. Samples without one (or at 1)
    are returned as they are.
    """
    scale = (sample.metadata or {}).get("scale")
    if scale is None or scale == 1 or scale == 1.0:
        return sample
    return resize_sample(sample, scale)
