"""Data containers shared by every part of the core.

``Sample``: an image with its per-instance masks (training data, ground truth).
``Prediction``: every per-pixel output of the network for one 2D image.
``Instances``: per-instance masks (overlaps allowed) with scores and classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Thresholds of the per-threshold mask classification head (Fathi et al.).
DEFAULT_TAUS: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)


@dataclass
class Sample:
    """One 2D image and its instances.

    Attributes
    ----------
    image : np.ndarray
        The image to segment, (H, W) or (C, H, W), raw intensities (not normalised).
    masks : np.ndarray
        (N, H, W) bool, one mask per instance; two masks may share pixels (worms cross).
    name : str
        A name unique in its data set (for BBBC010 the well, e.g. ``"A01"``).
    channels : dict of str to np.ndarray
        Other channels of the same field of view, each (H, W), e.g. ``{"w1": sytox}``.
    reviewed : np.ndarray or None
        (N,) bool: which instances a person has checked. None when unknown (all trusted).
    classes : np.ndarray or None
        (N,) int class of each instance, 1..C; None means all 1.
    metadata : dict
        Free-form provenance (source file, model, ...).
    """

    image: np.ndarray
    masks: np.ndarray
    name: str = ""
    channels: dict[str, np.ndarray] = field(default_factory=dict)
    reviewed: np.ndarray | None = None
    classes: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.masks = np.asarray(self.masks, dtype=bool)
        if self.masks.ndim == 2:
            self.masks = self.masks[None]
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {self.masks.shape}")
        hw = self.image.shape[-2:]
        if self.masks.shape[0] and self.masks.shape[1:] != hw:
            raise ValueError(
                f"Sample {self.name!r}: image is {hw[0]} x {hw[1]} but masks are "
                f"{self.masks.shape[1]} x {self.masks.shape[2]}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]

    @property
    def n_instances(self) -> int:
        """Number of instances."""
        return int(self.masks.shape[0])


@dataclass
class Prediction:
    """Per-pixel outputs of the network for one 2D image.

    Attributes
    ----------
    embeddings : np.ndarray
        (D, H, W) float32 embedding vectors (semi-convolutional ones include the coordinates).
    seediness : np.ndarray
        (H, W) float32 in [0, 1]: max over tau and foreground classes of ``class_scores``.
    class_scores : np.ndarray
        (T, C + 1, H, W) float32 probabilities (softmax over classes, class 0 = background)
        that the mask grown from a pixel at threshold ``taus[t]`` is a good instance.
    boundary : np.ndarray
        (H, W) float32 instance-aware boundary probability.
    foreground : np.ndarray
        (H, W) float32 foreground probability.
    taus : tuple of float
        The thresholds of ``class_scores``.
    metadata : dict
        Model name, device, timings, cache key, ...
    contrast : np.ndarray or None
        (H, W) float32: the segmented image channel divided by its local background
        (:func:`~napari_instseg.core.edges.local_contrast`), not a network output;
        :func:`~napari_instseg.core.predict.predict` fills it in and the edge refinement
        of :func:`~napari_instseg.core.instances.segment` reads it. None when unknown.
    model_grid : Prediction or None
        For a prediction made at another scale (``predict(..., scale=s)``): the same outputs
        on the grid the network ran on, (H, W) resized by ``s``, which
        :func:`~napari_instseg.core.instances.segment` uses instead of resizing these maps
        back (bringing the maps to the image's grid and again to the network's loses the
        worms' edges: 0.6x-sized BBBC010 images, AP 0.629 that way, 0.671 on the network's
        grid). None at scale 1; dropped by whatever resizes or edits the maps.
    """

    embeddings: np.ndarray
    seediness: np.ndarray
    class_scores: np.ndarray
    boundary: np.ndarray
    foreground: np.ndarray
    taus: tuple[float, ...] = DEFAULT_TAUS
    metadata: dict[str, Any] = field(default_factory=dict)
    contrast: np.ndarray | None = None
    model_grid: Prediction | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_grid is not None and not isinstance(self.model_grid, Prediction):
            raise TypeError(
                f"Prediction.model_grid must be a Prediction, not {type(self.model_grid)}"
            )
        hw = self.seediness.shape
        names = ("embeddings", "class_scores", "boundary", "foreground")
        for name in names + (("contrast",) if self.contrast is not None else ()):
            arr = getattr(self, name)
            if arr.shape[-2:] != hw:
                raise ValueError(
                    f"Prediction.{name} is {arr.shape[-2:]} but seediness is {hw}: "
                    "all outputs must share (H, W)"
                )
        if self.embeddings.ndim != 3:
            raise ValueError(f"embeddings must be (D, H, W), got {self.embeddings.shape}")
        if self.class_scores.ndim != 4 or self.class_scores.shape[0] != len(self.taus):
            raise ValueError(
                f"class_scores must be (T={len(self.taus)}, C+1, H, W), "
                f"got {self.class_scores.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return tuple(self.seediness.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes held by the maps, the contrast and the kept network grid, if any."""
        arrays = (self.embeddings, self.seediness, self.class_scores, self.boundary)
        arrays += (self.foreground,) + ((self.contrast,) if self.contrast is not None else ())
        grid = self.model_grid.nbytes if self.model_grid is not None else 0
        return int(sum(np.asarray(a).nbytes for a in arrays)) + grid

    @property
    def embedding_dim(self) -> int:
        """D, the number of embedding channels."""
        return int(self.embeddings.shape[0])

    @property
    def n_classes(self) -> int:
        """C, the number of foreground classes."""
        return int(self.class_scores.shape[1] - 1)

    def best_tau_class(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel, the best threshold, class and score (Fathi et al.).

        Returns
        -------
        tau : np.ndarray
            (H, W) float32, the tau in ``taus`` with the highest foreground-class score.
        cls : np.ndarray
            (H, W) int, the best class, 1..C.
        score : np.ndarray
            (H, W) float32, the score of that (tau, class).
        """
        fg = self.class_scores[:, 1:]  # (T, C, H, W)
        t, c, h, w = fg.shape
        flat = fg.reshape(t * c, h, w)
        best = flat.argmax(axis=0)
        score = np.take_along_axis(flat, best[None], axis=0)[0]
        tau = np.asarray(self.taus, dtype=np.float32)[best // c]
        return tau, (best % c + 1).astype(np.int64), score.astype(np.float32)


@dataclass
class Instances:
    """Instances in one 2D image: per-instance masks that may overlap.

    Attributes
    ----------
    masks : np.ndarray
        (N, H, W) bool; numeric 0/1 masks are converted, any other value (a probability,
        NaN, a label) raises ``ValueError``.
    scores : np.ndarray
        (N,) float32 confidence in [0, 1].
    classes : np.ndarray
        (N,) int, 1..C.
    seeds : np.ndarray or None
        (N, 2) int (row, col) of the seed each instance grew from, when it has one.
    taus : np.ndarray or None
        (N,) float32 threshold each instance was grown at, when it has one.
    """

    masks: np.ndarray
    scores: np.ndarray | None = None
    classes: np.ndarray | None = None
    seeds: np.ndarray | None = None
    taus: np.ndarray | None = None

    def __post_init__(self) -> None:
        masks = np.asarray(self.masks)
        if masks.dtype != bool:
            numeric = masks.dtype.kind in "biuf"
            if not numeric or ((masks != 0) & (masks != 1)).any():
                odd = masks[(masks != 0) & (masks != 1)].ravel()[:1] if numeric else []
                example = f" with values such as {odd[0].item()!r}" if len(odd) else ""
                raise ValueError(
                    f"masks must be boolean (or 0/1), got dtype {masks.dtype}{example}; "
                    "threshold probabilities first (e.g. masks > 0.5) or use "
                    "Instances.from_labels for a label image"
                )
        self.masks = masks.astype(bool, copy=False)
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got shape {self.masks.shape}")
        n = self.masks.shape[0]
        self.scores = (
            np.ones(n, np.float32) if self.scores is None else np.asarray(self.scores, np.float32)
        )
        self.classes = (
            np.ones(n, np.int64) if self.classes is None else np.asarray(self.classes, np.int64)
        )
        if self.scores.shape != (n,) or self.classes.shape != (n,):
            raise ValueError("scores and classes must have one entry per mask")

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return tuple(self.masks.shape[1:])  # type: ignore[return-value]

    @property
    def areas(self) -> np.ndarray:
        """(N,) int64 pixel count of every mask."""
        return self.masks.sum(axis=(1, 2), dtype=np.int64)

    def to_labels(self) -> np.ndarray:
        """Flatten to an (H, W) int32 label image, instance i gets label i + 1.

        Rule for pixels covered by several masks: the instance with the smaller area wins
        (so a short worm lying over a long one stays visible and both keep their own label
        on the rest of their body); ties go to the higher score, then the lower index.
        The overlapping pixels themselves are kept in ``masks``.

        Returns
        -------
        np.ndarray
            (H, W) int32 labels, 0 = background.
        """
        labels = np.zeros(self.shape, np.int32)
        if len(self) == 0:
            return labels
        areas = self.areas
        # paint largest first so that smaller (then higher-score) instances end on top
        order = np.lexsort((-np.arange(len(self)), self.scores, -areas))
        for i in order:
            labels[self.masks[i]] = i + 1
        return labels

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> Instances:
        """Build instances from an (H, W) label image (no overlaps), ordered by label."""
        labels = np.asarray(labels)
        ids = np.unique(labels)
        ids = ids[ids != 0]
        if not len(ids):
            return cls(masks=np.zeros((0, *labels.shape), bool))
        return cls(masks=labels[None] == ids[:, None, None])


def sparse_zeros(shape: tuple[int, ...], dtype: Any = bool) -> np.ndarray:
    """Zeros whose memory pages are made only where written, in small pages.

    For full-image masks of which only a box is ever written (a worm's mask on a large
    image). numpy asks Linux for transparent huge pages for every array of 4 MB or more,
    so writing a worm's box into ``np.zeros((H, W))`` makes and zero-fills 2 MB pages
    (and may first compact memory for them): 955 worm masks of a 4160 x 5568 image took
    16 s and 2.8 GB that way, 1.4 s and 0.8 GB in an anonymous memory map (small pages,
    zero until written). Small arrays are plain ``np.zeros``.

    Parameters
    ----------
    shape : tuple of int
        The array's shape.
    dtype : numpy dtype
        Its dtype.

    Returns
    -------
    np.ndarray
        A writable, C-contiguous array of zeros.
    """
    import mmap

    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    private = getattr(mmap, "MAP_PRIVATE", None)
    if size < 1 << 22 or private is None:  # (Windows: numpy asks for no huge pages there)
        return np.zeros(shape, dtype)
    # private: a page never written reads as the kernel's zero page (a shared anonymous
    # map would make every page it reads, e.g. 23 MB for ``mask.any()``)
    buffer = mmap.mmap(-1, size, flags=private | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buffer, dtype).reshape(shape)


@dataclass
class CroppedInstances:
    """Instances whose masks are kept as crops: the working form of the boundary pipeline.

    Mask ``k`` is ``crops[k]`` placed at rows ``boxes[k][0]:boxes[k][1]`` and columns
    ``boxes[k][2]:boxes[k][3]`` of an image of ``shape``, and empty elsewhere. A crop may be
    larger than its mask's bounding box (a margin) but always lies inside the image. On a
    large image this holds each worm in its box instead of a full-image mask;
    :meth:`to_instances` makes the (N, H, W) masks of :class:`Instances` once, at the end.

    Attributes
    ----------
    shape : tuple of int
        (H, W) of the image.
    boxes : list of tuple of int
        (r0, r1, c0, c1) of every crop in the image.
    crops : list of np.ndarray
        (r1 - r0, c1 - c0) bool masks.
    scores, classes, seeds, taus : np.ndarray or None
        As in :class:`Instances`.
    """

    shape: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    crops: list[np.ndarray]
    scores: np.ndarray
    classes: np.ndarray
    seeds: np.ndarray | None = None
    taus: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def from_instances(cls, instances: Instances) -> CroppedInstances:
        """Each mask of ``instances`` cut to its bounding box (an empty one to 1 x 1)."""
        boxes, crops = [], []
        for mask in instances.masks:
            rows = np.flatnonzero(mask.any(axis=1))
            if len(rows):
                cols = np.flatnonzero(mask.any(axis=0))
                box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
            else:  # an empty mask: one empty pixel
                box = (0, 1, 0, 1)
            boxes.append(box)
            crops.append(mask[box[0] : box[1], box[2] : box[3]].copy())
        return cls(
            shape=instances.shape,
            boxes=boxes,
            crops=crops,
            scores=instances.scores,
            classes=instances.classes,
            seeds=instances.seeds,
            taus=instances.taus,
        )

    def to_instances(self) -> Instances:
        """The :class:`Instances`: one (N, H, W) allocation, every crop pasted in."""
        masks = sparse_zeros((len(self), *self.shape), bool)  # each crop's pages only
        for mask, (r0, r1, c0, c1), crop in zip(masks, self.boxes, self.crops, strict=True):
            mask[r0:r1, c0:c1] = crop
        return Instances(
            masks=masks,
            scores=self.scores,
            classes=self.classes,
            seeds=self.seeds,
            taus=self.taus,
        )

    @property
    def areas(self) -> np.ndarray:
        """(N,) int64 pixel count of every mask."""
        return np.array([np.count_nonzero(c) for c in self.crops], np.int64)

    def region(self, k: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """Mask ``k``'s pixels in ``box`` = (r0, r1, c0, c1) of the image (a new array)."""
        r0, r1, c0, c1 = box
        out = np.zeros((r1 - r0, c1 - c0), bool)
        b0, b1, b2, b3 = self.boxes[k]
        i0, i1, j0, j1 = max(r0, b0), min(r1, b1), max(c0, b2), min(c1, b3)
        if i0 < i1 and j0 < j1:
            out[i0 - r0 : i1 - r0, j0 - c0 : j1 - c0] = self.crops[k][
                i0 - b0 : i1 - b0, j0 - b2 : j1 - b2
            ]
        return out

    def window(self, k: int, margin: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
        """Mask ``k`` in its bounding box grown by ``margin`` (within the image): (box, mask).

        An empty mask gives a 0 x 0 box at the origin.
        """
        crop = self.crops[k]
        rows = np.flatnonzero(crop.any(axis=1))
        if not len(rows):
            return (0, 0, 0, 0), np.zeros((0, 0), bool)
        cols = np.flatnonzero(crop.any(axis=0))
        r0, c0 = self.boxes[k][0], self.boxes[k][2]
        box = (
            max(r0 + int(rows[0]) - margin, 0),
            min(r0 + int(rows[-1]) + 1 + margin, self.shape[0]),
            max(c0 + int(cols[0]) - margin, 0),
            min(c0 + int(cols[-1]) + 1 + margin, self.shape[1]),
        )
        return box, self.region(k, box)

    def cover(self) -> np.ndarray:
        """(H, W) int32: how many masks hold each pixel."""
        count = np.zeros(self.shape, np.int32)
        for (r0, r1, c0, c1), crop in zip(self.boxes, self.crops, strict=True):
            count[r0:r1, c0:c1] += crop
        return count
