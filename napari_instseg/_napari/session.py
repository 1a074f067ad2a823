"""The editing session behind the dock widget (napari layers, no Qt).

A :class:`Session` ties one image layer to its :class:`~napari_instseg.core.types.Prediction`,
to the instances being edited and to the layers that show them. Instances are kept in a
side model (a tuple of :class:`Worm`, one full mask each, so overlaps survive); the
``worms`` Labels layer is its flattened view. Every edit writes the difference to the
Labels layer with ``data_setitem`` so that it is one step of napari's undo history
(Ctrl+Z); after an undo/redo (or painting by hand) :meth:`Session.sync` brings the side
model back in line with the Labels layer.
"""

from __future__ import annotations

import datetime as _dt
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from ..core.types import CroppedInstances, Instances, Prediction, Sample, sparse_zeros
from .layers import (
    LAYER_NAMES,
    OWN_LAYER,
    class_score_at,
    class_score_name,
    empty_map_layers,
    prediction_layers,
)

Point = tuple[int, int]

_LIME = np.array([0.0, 1.0, 0.0, 1.0], np.float32)  # positive seeds
_RED = np.array([1.0, 0.0, 0.0, 1.0], np.float32)  # negative seeds

#: Metadata key of the plugin on layers it creates or reads.
META = "napari_instseg"

_SESSIONS: weakref.WeakSet[Session] = weakref.WeakSet()


def recorded_scale(meta: dict[str, Any] | None) -> float | None:
    """The scale recorded with labels the reader opened (their ``metadata[META]``).

    Parameters
    ----------
    meta : dict or None
        A Labels layer's ``metadata["napari_instseg"]`` (or one plane's entry of it).

    Returns
    -------
    float or None
        The export's ``scale`` (1 when it recorded none); None when the labels do not come
        from the plugin's reader (nothing is known about them).
    """
    if not meta or "provenance" not in meta:
        return None
    try:
        return float((meta.get("provenance") or {}).get("scale") or 1.0)
    except (TypeError, ValueError):
        return None


def live_session_for(labels: Any) -> Session | None:
    """Return the live session whose Labels layer holds ``labels`` (the same array), if any.

    Parameters
    ----------
    labels : array
        A Labels layer's data, e.g. as handed to a napari writer.

    Returns
    -------
    Session or None
        The session, so writers can export its full (overlapping) masks.
    """
    for session in list(_SESSIONS):
        layer = session.labels_layer
        if layer is not None and layer.data is labels:
            return session
    return None


def live_sessions(viewer: Any) -> list[Session]:
    """The live sessions on ``viewer`` whose image layer is still in it.

    A widget opened again (after napari's close button took the first one out) carries on
    with them.
    """
    return [
        session
        for session in list(_SESSIONS)
        if session.viewer is viewer and session.image_layer in viewer.layers
    ]


@dataclass(frozen=True, eq=False)
class Worm:
    """One instance in the side model (immutable: edits create new ``Worm`` objects).

    Attributes
    ----------
    label : int
        Its value in the Labels layer (stable across edits of other instances).
    mask : np.ndarray
        (H, W) bool full mask, including pixels hidden under overlapping instances.
    seeds, negatives : tuple of (row, col)
        Positive and negative seeds it was grown from (empty when painted or read).
    tau : float or None
        Similarity threshold it was grown at.
    score : float
        Confidence in [0, 1] (network score; 1 for hand-made instances).
    cls : int
        Class, 1..C.
    reviewed : bool
        Whether a person has checked it.
    edited : bool
        Whether a person has changed it (kept by automatic segmentation by default).
    origin : str
        ``"auto"``, ``"click"``, ``"hand"`` or ``"file"``.
    scale : float or None
        The scale of the prediction it was grown or segmented from (the ``scale`` field:
        the image was resized by it for the network); for a worm read from an export, the
        scale recorded there (1 when none). None when unknown (painted by hand, or read
        from a Labels layer the plugin did not write). Correcting a worm (seeds, cuts,
        merge, split, painting) keeps its scale; see :meth:`Session.labels_scale`.
    """

    label: int
    mask: np.ndarray
    seeds: tuple[Point, ...] = ()
    negatives: tuple[Point, ...] = ()
    tau: float | None = None
    score: float = 1.0
    cls: int = 1
    reviewed: bool = False
    edited: bool = False
    origin: str = "auto"
    scale: float | None = None

    @cached_property
    def area(self) -> int:
        """Number of pixels of the full mask."""
        return int(np.count_nonzero(self.mask))

    @cached_property
    def bbox(self) -> tuple[int, int, int, int]:
        """(row0, row1, col0, col1) of the mask, ends exclusive; (0, 0, 0, 0) when empty."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        if not len(rows):
            return (0, 0, 0, 0)
        cols = np.flatnonzero(self.mask.any(axis=0))
        return (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def render(worms: Sequence[Worm], shape: tuple[int, int]) -> np.ndarray:
    """Flatten worms to an (H, W) int32 label image, as ``Instances.to_labels`` does.

    Pixels covered by several masks go to the smaller instance (ties: higher score).

    Parameters
    ----------
    worms : sequence of Worm
        The instances.
    shape : (int, int)
        (H, W).

    Returns
    -------
    np.ndarray
        (H, W) int32 labels, 0 = background, each worm painted with its ``label``.
    """
    return render_box(worms, (0, shape[0], 0, shape[1]))


def render_box(worms: Sequence[Worm], box: tuple[int, int, int, int]) -> np.ndarray:
    """Like :func:`render`, for the crop ``(row0, row1, col0, col1)`` of the image only."""
    r0, r1, c0, c1 = box
    labels = np.zeros((r1 - r0, c1 - c0), np.int32)
    order = sorted(worms, key=lambda w: (-w.area, w.score))
    for worm in order:
        a0, a1, b0, b1 = worm.bbox
        # the mask is empty outside its box: only the overlap of the two is read
        a0, a1, b0, b1 = max(a0, r0), min(a1, r1), max(b0, c0), min(b1, c1)
        if a1 <= a0 or b1 <= b0:
            continue
        labels[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0][worm.mask[a0:a1, b0:b1]] = worm.label
    return labels


def _from_crop(
    found: CroppedInstances, k: int
) -> tuple[np.ndarray, int, tuple[int, int, int, int]]:
    """Instance ``k`` of ``found``: its (H, W) mask, area and tight box (as ``Worm.bbox``)."""
    r0, r1, c0, c1 = found.boxes[k]
    crop = found.crops[k]
    mask = sparse_zeros(found.shape, bool)  # the box's pages only (no huge pages)
    mask[r0:r1, c0:c1] = crop
    rows = np.flatnonzero(crop.any(axis=1))
    if not len(rows):
        return mask, 0, (0, 0, 0, 0)
    cols = np.flatnonzero(crop.any(axis=0))
    box = (r0 + int(rows[0]), r0 + int(rows[-1]) + 1, c0 + int(cols[0]), c0 + int(cols[-1]) + 1)
    return mask, int(np.count_nonzero(crop)), box


def _union_box(worms: Iterable[Worm]) -> tuple[int, int, int, int] | None:
    boxes = [w.bbox for w in worms if w.bbox[1] > w.bbox[0]]
    if not boxes:
        return None
    b = np.array(boxes)
    return (int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max()))


class ReviewStep(tuple):
    """A review mark (K) as a step of the ``worms`` layer's undo history.

    napari's Labels history holds pixel edits only: items of atoms ``(indices, before,
    after)``, replayed by writing ``before`` (undo) or ``after`` (redo) at ``indices``. A
    review changes no pixel, so its atom has empty indices and values: replaying it writes
    nothing, and the session tells a review undone or redone by where napari's undo
    (Ctrl+Z, Labels.undo, the widget's Undo) has moved it: into the redo history, or
    back (:meth:`Session.sync`).

    Parameters
    ----------
    label : int
        The worm reviewed (labels are stable across edits).
    before, after : bool
        Its reviewed flag before and after the step.
    ndim : int
        Dimensions of the label image.
    dtype : numpy dtype
        The label image's dtype.
    """

    label: int
    before: bool
    after: bool

    def __new__(cls, label: int, before: bool, after: bool, ndim: int, dtype: Any) -> ReviewStep:
        """Make the empty atom (see the class)."""
        nowhere = tuple(np.zeros(0, np.intp) for _ in range(ndim))
        step = super().__new__(cls, (nowhere, np.zeros(0, dtype), np.zeros(0, dtype)))
        step.label, step.before, step.after = int(label), bool(before), bool(after)
        return step


def _review_steps(history: Any) -> dict[int, ReviewStep]:
    """The review steps in one of a Labels layer's histories (undo or redo), by id."""
    return {
        id(item[0]): item[0]
        for item in history or ()
        if len(item) == 1 and isinstance(item[0], ReviewStep)
    }


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


_CHUNK = 1 << 16  # pixels hashed at a time: the passes stay in the cache


def pixel_sum(flat: np.ndarray, values: np.ndarray) -> int:
    """Sum modulo 2**64 of a hash of (flat index, value) over the pixels of nonzero value.

    The additive part of :func:`state_key`: a change of some pixels changes the sum by
    ``pixel_sum(idx, new) - pixel_sum(idx, old)``, so an edit updates the key from the
    pixels it wrote (:func:`updated_key`) instead of reading the whole image again. The
    hash is a multiply-xorshift of ``index ^ (value << 40)``.

    Parameters
    ----------
    flat : np.ndarray
        (N,) flat (C-order) indices of the pixels.
    values : np.ndarray
        (N,) their integer labels.

    Returns
    -------
    int
        The sum, in [0, 2**64).
    """
    values = np.asarray(values).reshape(-1)
    flat = np.asarray(flat).reshape(-1)
    total = 0
    for start in range(0, len(values), _CHUNK):
        part = values[start : start + _CHUNK]
        keep = part != 0
        x = flat[start : start + _CHUNK][keep].astype(np.uint64)
        x ^= part[keep].astype(np.int64).view(np.uint64) << np.uint64(40)
        x *= _GOLDEN
        x ^= x >> np.uint64(29)
        x *= _MIX1
        x ^= x >> np.uint64(32)
        total += int(x.sum(dtype=np.uint64))
    return total & _MASK64


def state_key(labels: np.ndarray) -> tuple[tuple[int, ...], str, int]:
    """A key of a label image's content: shape, dtype and a sum of hashed pixels.

    Used to find the side model that belongs to a label image after undo/redo. The sum
    (:func:`pixel_sum` of every labelled pixel) is additive, so an edit updates the key
    from the pixels it changed (:func:`updated_key`) instead of reading the whole label
    image again (two checksums of a 4160 x 5568 image cost ~30 ms per click). A collision
    of two 64-bit sums among the few hundred states a session remembers is far less likely
    than a stray cosmic ray.

    Parameters
    ----------
    labels : np.ndarray
        The label image.

    Returns
    -------
    tuple
        ``(shape, dtype, sum)``.
    """
    arr = np.asarray(labels)
    flat = np.flatnonzero(arr)
    return (arr.shape, arr.dtype.str, pixel_sum(flat, arr.reshape(-1)[flat]))


def updated_key(
    key: tuple[tuple[int, ...], str, int], flat: np.ndarray, old: np.ndarray, new: np.ndarray
) -> tuple[tuple[int, ...], str, int]:
    """:func:`state_key` of a label image after the pixels ``flat`` went from ``old`` to ``new``.

    Parameters
    ----------
    key : tuple
        The key before the change.
    flat : np.ndarray
        (N,) flat indices of the changed pixels.
    old, new : np.ndarray
        (N,) their labels before and after.

    Returns
    -------
    tuple
        The key after, equal to ``state_key`` of the changed image.
    """
    total = (key[2] + pixel_sum(flat, new) - pixel_sum(flat, old)) & _MASK64
    return (key[0], key[1], total)


@contextmanager
def same_extent(viewer: Any, layer: Any) -> Iterator[None]:
    """Skip the viewer's dims/extent update while ``layer``'s data changes within its extent.

    ``layer.data = ...`` (and Points data changes) make napari's viewer recompute the dims
    ranges of every layer, which costs more than a small edit itself. When the new data
    has the same shape (maps) or lies inside the image (seeds), the ranges cannot change,
    so that one callback is blocked (``EventEmitter.blocker(callback)``); every other
    listener (vispy, layer list, other plugins) still gets the event.
    """
    callback = getattr(viewer, "_on_layers_change", None)
    emitter = getattr(getattr(layer, "events", None), "data", None)
    if callback is None or emitter is None:
        yield
        return
    with emitter.blocker(callback):
        yield


@contextmanager
def _keep_active_layer(layers: Any) -> Iterator[None]:
    """Insert layers without making them the active (selected) one.

    napari selects every inserted layer, which swaps the layer controls (a costly Qt
    rebuild per hidden map) and, while maps are still being shown, would send the
    user's clicks to a map instead of the ``worms`` layer. Uses napari's
    ``_activate_on_insert`` switch where it exists; otherwise inserts as napari does.
    """
    if not hasattr(layers, "_activate_on_insert"):
        yield
        return
    before = layers._activate_on_insert
    layers._activate_on_insert = False
    try:
        yield
    finally:
        layers._activate_on_insert = before


def set_layer_data(viewer: Any, layer: Any, data: np.ndarray) -> None:
    """``layer.data = data``, without the viewer-wide extent update when the shape is kept."""
    old = getattr(layer, "data", None)
    same = getattr(old, "shape", None) == data.shape and getattr(old, "ndim", 0) == data.ndim
    with same_extent(viewer, layer) if same else nullcontext():
        layer.data = data


def _to_point(position: Sequence[float], shape: tuple[int, int]) -> Point | None:
    r, c = (int(round(float(v))) for v in position[-2:])
    if 0 <= r < shape[0] and 0 <= c < shape[1]:
        return (r, c)
    return None


class MapLayers(dict):
    """The map layers of a viewer (key of :data:`LAYER_NAMES` -> layer), shared by sessions.

    Adding a layer is among the costliest things a napari viewer does (its vispy visual,
    its controls, a layer-list repaint: 0.1-0.2 s each here), so the widget keeps one set of
    map layers that shows the maps of the image last run or chosen, and only changes their
    data when another image's maps are shown. :attr:`owner` is the session whose maps
    they show.
    """

    owner: Any = None


class Session:
    """Prediction, instances and layers of one image in a napari viewer.

    Parameters
    ----------
    viewer : napari.Viewer or napari.components.ViewerModel
        The viewer to add layers to.
    image_layer : napari.layers.Image
        The image being segmented (2D, grey or multi-channel first).
    """

    max_states = 256
    #: a new click's mask this close (IoU) to an instance under the click is that instance
    SAME_WORM_IOU = 0.9

    def __init__(self, viewer: Any, image_layer: Any) -> None:
        self.viewer = viewer
        self.image_layer = image_layer
        self.prediction: Prediction | None = None
        self.model_name: str = ""
        self.worms: tuple[Worm, ...] = ()
        self.selected: int | None = None
        self.tau: float = 0.5
        #: clicks refine the grown mask's outline by the image contrast, with the model's
        #: tuned thresholds (``grow(..., edge_thresholds="auto")``); False: never
        self.refine_edges: bool = True
        #: clicks start from the automatic segment under the first click and correct it
        #: (:func:`~napari_instseg.core.pick.grow_from_segments`) where the model was tuned
        #: for automatic segmentation (:func:`~napari_instseg.core.pick.starts_from_segments`);
        #: False (or an untuned model, or a mosaic): the embedding growth
        self.click_segments: bool = True
        self.labels_layer: Any = None
        self.seeds_layer: Any = None
        self.similarity_layer: Any = None
        #: the map layers; the widget shares one :class:`MapLayers` between its sessions
        self.map_layers: MapLayers = MapLayers()
        self._layer_data: list[tuple[str, Any, dict]] | None = None
        self.last_method: dict[str, Any] = {}
        self._states: OrderedDict[Any, tuple[Worm, ...]] = OrderedDict()
        #: the review steps put in the worms layer's undo history, by id: the step and
        #: whether it is done (in the undo history) or undone (in the redo history)
        self._reviews: dict[int, tuple[ReviewStep, bool]] = {}
        #: what the last :meth:`sync` that changed the worms did to reviews ("" when
        #: nothing: a pixel edit), for the widget's message
        self.review_note = ""
        self._digest: Any = None
        #: the Labels layer whose data still has ``_digest`` (no data or paint event came
        #: since it was computed); None when unknown. Clicks skip re-hashing the label
        #: image then (two checksums of 23 MB per click on a 2080 x 2784 image)
        self._digest_layer: Any = None
        #: during a live preview: the digest of the label image after its last edit
        self._live_digest: Any = None
        #: how many napari ``set_data`` events this session has synced on (the widget's
        #: undo/redo syncs by itself only when napari sent none: a hidden layer's)
        self.set_data_syncs = 0
        self._seeds_shown: tuple[Any, ...] | None = None
        self._writing = False
        self._preview_start: tuple[Worm, ...] | None = None
        self._preview_history: Any = None
        #: ``defer(callback)``, or None. The widget sets it to run the callback once the
        #: canvas has drawn the edit: a click's mask then reaches the screen one frame
        #: before its seed marker instead of waiting for it (updating a Points layer costs
        #: about as much as the mask itself, the draw included).
        self.defer: Any = None
        #: called after the worms were brought in line with a hand edit or napari's undo
        #: (:meth:`sync`); the widget updates its review count
        self.on_worms_changed: Any = None
        self._seeds_pending = False
        _SESSIONS.add(self)

    # ------------------------------------------------------------------ basics
    @property
    def image(self) -> np.ndarray:
        """The image as (H, W) or (C, H, W) (an RGB layer as its luminance, as the CLI)."""
        data = np.asarray(self.image_layer.data)
        if getattr(self.image_layer, "rgb", False):
            from ..core.predict import luminance

            data = luminance(data)
        if data.ndim not in (2, 3):
            raise ValueError(
                f"layer {self.image_layer.name!r} is {data.ndim}D; napari-instseg segments "
                "2D images (H, W) or channel stacks (C, H, W)"
            )
        return data

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]

    def worm(self, label: int | None) -> Worm | None:
        """Return the worm with this label, or None."""
        for worm in self.worms:
            if worm.label == label:
                return worm
        return None

    def label_at(self, point: Point) -> int:
        """Label shown in the Labels layer at ``point`` (0 for background)."""
        self._sync_if_changed()
        if self.labels_layer is None:
            return 0
        return int(np.asarray(self.labels_layer.data)[point])

    def world_to_point(self, position: Sequence[float]) -> Point | None:
        """Convert a world position (e.g. ``event.position``) to an image pixel, or None."""
        data = self.image_layer.world_to_data(position)
        return _to_point(data, self.shape)

    @property
    def instances(self) -> Instances:
        """The side model as :class:`~napari_instseg.core.types.Instances` (label order)."""
        worms = sorted(self.worms, key=lambda w: w.label)
        h, w = self.shape
        masks = np.stack([x.mask for x in worms]) if worms else np.zeros((0, h, w), bool)
        seeds = np.array([x.seeds[0] if x.seeds else (-1, -1) for x in worms], np.int64)
        taus = np.array([np.nan if x.tau is None else x.tau for x in worms], np.float32)
        return Instances(
            masks=masks,
            scores=np.array([x.score for x in worms], np.float32),
            classes=np.array([x.cls for x in worms], np.int64),
            seeds=seeds.reshape(-1, 2),
            taus=taus,
        )

    # ------------------------------------------------------------- prediction
    def set_prediction(
        self,
        prediction: Prediction,
        model_name: str = "",
        layers: list[tuple[str, Any, dict]] | None = None,
    ) -> None:
        """Show a prediction's maps as layers (replacing earlier ones) and keep it for edits.

        Parameters
        ----------
        prediction : Prediction
            Network outputs for :attr:`image`.
        model_name : str
            Shown in provenance when exporting.
        layers : list, optional
            The layer data of :func:`~napari_instseg._napari.layers.prediction_layers`, when
            already computed (e.g. in a worker thread); computed here otherwise.
        """
        for _ in self.iter_set_prediction(prediction, model_name, layers):
            pass

    def iter_set_prediction(
        self,
        prediction: Prediction,
        model_name: str = "",
        layers: list[tuple[str, Any, dict]] | None = None,
    ) -> Iterator[str]:
        """Like :meth:`set_prediction`, one layer at a time (a generator).

        It yields after each layer it adds or updates, so a GUI can spread the work over
        several turns of its event loop and stay responsive. The prediction is usable for
        edits from the first step on.

        Yields
        ------
        str
            The key of the layer just shown (see :data:`LAYER_NAMES`).
        """
        self.keep_prediction(prediction, model_name, layers)
        layers = self._layer_data
        self.map_layers.owner = self
        # the layers needed to click come first, so editing can start while the maps follow
        self.ensure_labels_layer()
        yield "worms"
        self._ensure_seeds_layer()
        self._raise_edit_layers()
        yield "seeds"
        yield from self._iter_put_map_layers(layers)
        self._raise_edit_layers()

    def keep_prediction(
        self,
        prediction: Prediction,
        model_name: str = "",
        layers: list[tuple[str, Any, dict]] | None = None,
    ) -> None:
        """Hold a prediction without showing it (its image is not the one chosen now).

        The shared map layers keep showing the chosen image's maps; choosing this image
        shows these (:meth:`iter_show_maps`), with the layer data given here.
        """
        if prediction.shape != self.shape:
            raise ValueError(
                f"prediction is {prediction.shape} but image {self.image_layer.name!r} is "
                f"{self.shape}"
            )
        self.prediction = prediction
        self.model_name = model_name
        self._layer_data = (
            layers if layers is not None else prediction_layers(prediction, self.tau)
        )
        if self.map_layers.owner is self:
            self.map_layers.owner = None

    def iter_add_empty_maps(self) -> Iterator[str]:
        """Add the map layers, hidden and empty, if the viewer has none (one per step).

        Run when an image is chosen: the model's results then only replace the layers'
        data instead of adding layers (0.1-0.2 s of the GUI thread each) while the user
        waits. Map layers that exist already are left as they are.

        Yields
        ------
        str
            The key of the layer just added.
        """
        for item in empty_map_layers(self.shape):
            layer = self.map_layers.get(item[0])
            if layer is None or layer not in self.viewer.layers:  # checked at each step
                yield from self._iter_put_map_layers([item])

    def _iter_put_map_layers(self, layers: list[tuple[str, Any, dict]]) -> Iterator[str]:
        """Update the shared map layers' data, adding the missing ones under the edit layers."""
        from napari.layers import Image

        transform = self._transform_kwargs()
        for key, data, kwargs in layers:
            name = LAYER_NAMES[key]
            if key == "class_score" and "tau" in kwargs.get("metadata", {}):
                name = class_score_name(kwargs["metadata"]["tau"])
            layer = self.map_layers.get(key)
            if layer is not None and layer in self.viewer.layers:
                set_layer_data(self.viewer, layer, data)
                layer.name = name
                if "metadata" in kwargs:
                    layer.metadata.update(kwargs["metadata"])
                for attr, value in transform.items():  # maps shown before for another image
                    if tuple(getattr(layer, attr)[-2:]) != tuple(value):
                        setattr(layer, attr, value)
            else:  # inserted under the edit layers: no reordering afterwards
                layer = Image(data, name=name, **transform, **kwargs)
                layer.metadata[OWN_LAYER] = key
                below = [self.viewer.layers.index(x) for x in self._edit_layers()]
                with _keep_active_layer(self.viewer.layers):
                    self.viewer.layers.insert(min(below, default=len(self.viewer.layers)), layer)
                self.map_layers[key] = layer
            yield key

    def _edit_layers(self) -> list[Any]:
        """Similarity, worms and seeds layers that are in the viewer, bottom to top."""
        return [
            layer
            for layer in (self.similarity_layer, self.labels_layer, self.seeds_layer)
            if layer is not None and layer in self.viewer.layers
        ]

    @property
    def maps_shown(self) -> bool:
        """Whether the map layers show this session's prediction."""
        return self.map_layers.owner is self and bool(self.map_layers)

    def iter_show_maps(self) -> Iterator[str]:
        """Show this session's prediction again (after another image's), one layer per step.

        Uses the layer data computed when the prediction was first shown: nothing is
        recomputed. Yields nothing without a prediction.
        """
        if self.prediction is None:
            return
        yield from self.iter_set_prediction(self.prediction, self.model_name, self._layer_data)
        self.set_tau_display(self.tau)

    def ensure_edit_layers(self) -> None:
        """Create the ``worms`` and ``seeds`` layers if needed (before any prediction)."""
        self.ensure_labels_layer()
        self._ensure_seeds_layer()
        self._raise_edit_layers()

    def set_tau_display(self, tau: float) -> None:
        """Show the class scores of the threshold nearest to ``tau``."""
        layer = self.map_layers.get("class_score")
        if self.prediction is None or layer is None or self.map_layers.owner is not self:
            return
        taus = np.asarray(self.prediction.taus, dtype=np.float32)
        used = float(taus[int(np.abs(taus - tau).argmin())])
        if layer.metadata.get("tau") != used:
            score, used = class_score_at(self.prediction, tau)
            set_layer_data(self.viewer, layer, score)
            layer.metadata["tau"] = used
            layer.name = class_score_name(used)

    def _transform_kwargs(self) -> dict[str, Any]:
        layer = self.image_layer
        nd = 2
        return {
            "scale": tuple(layer.scale[-nd:]),
            "translate": tuple(layer.translate[-nd:]),
        }

    def _edit_layer_name(self, key: str) -> str:
        """``worms`` / ``seeds``, or ``<image> worms`` when another layer has that name.

        (napari would call it ``worms [1]``, which says nothing of whose worms they are.)
        """
        name = LAYER_NAMES[key]
        return name if name not in self.viewer.layers else f"{self.image_layer.name} {name}"

    def ensure_labels_layer(self) -> Any:
        """Create the ``worms`` Labels layer if needed and return it."""
        if self.labels_layer is not None and self.labels_layer in self.viewer.layers:
            return self.labels_layer
        labels = render(self.worms, self.shape)
        if labels.max(initial=0) <= np.iinfo(np.uint16).max:
            # napari shows uint16 labels as they are; int32 ones go through a numba
            # kernel whose compilation, on the first Labels layer, froze the viewer ~1 s
            labels = labels.astype(np.uint16)
        self.labels_layer = self.viewer.add_labels(
            labels,
            name=self._edit_layer_name("worms"),
            opacity=0.55,
            metadata={META: self._labels_owner()},
            **self._transform_kwargs(),
        )
        self._digest = None
        self._register()
        self.labels_layer.events.set_data.connect(self._on_labels_changed)
        self.labels_layer.events.paint.connect(self._on_labels_changed)
        return self.labels_layer

    def _labels_owner(self) -> dict[str, Any]:
        """What the worms layer the plugin makes records of its image: name and link id."""
        from .io import layer_link

        owner: dict[str, Any] = {"image": self.image_layer.name}
        link = layer_link(self.image_layer)  # an image the reader read: its id
        if link is not None:
            owner["link"] = link
        return owner

    def forget_deleted_layers(self) -> bool:
        """After the user deleted the ``worms`` layer: its worms are gone with it.

        Deleting a layer discards its data in napari; the worms are not brought back by
        the next edit. Returns True if the layer was gone (and the worms forgotten).
        """
        if self.labels_layer is None or self.labels_layer in self.viewer.layers:
            return False
        self.labels_layer = None
        self.worms = ()
        self.selected = None
        self._states.clear()
        self._reviews.clear()
        self._digest = None
        self._update_seeds_layer()
        return True

    def adopt_labels_layer(self, layer: Any) -> None:
        """Edit an existing Labels layer (e.g. one opened with the reader).

        Overlapping masks stored by the reader in ``layer.metadata`` are used when they
        agree with the label image.
        """
        data = np.asarray(layer.data)
        if data.shape != self.shape:
            raise ValueError(f"labels layer {layer.name!r} is {data.shape}, image is {self.shape}")
        meta = layer.metadata.get(META, {})
        masks = meta.get("masks")
        reviewed = meta.get("reviewed")
        recorded = recorded_scale(meta)
        worms: list[Worm] = []
        if (
            masks is not None
            and len(masks)
            and np.array_equal(
                render(
                    [Worm(i + 1, np.asarray(m, bool)) for i, m in enumerate(masks)], self.shape
                ),
                data,
            )
        ):
            # an export records which worms a person edited: Segment all keeps those
            edited = (meta.get("provenance") or {}).get("edited")
            if edited is None or len(edited) != len(masks):
                edited = [False] * len(masks)
            for i, m in enumerate(masks):
                rev = bool(reviewed[i]) if reviewed is not None else False
                worms.append(
                    Worm(
                        i + 1, np.asarray(m, bool), reviewed=rev, edited=bool(edited[i]),
                        origin="file", scale=recorded,
                    )
                )  # fmt: skip
        else:
            for lab in np.unique(data):
                if lab != 0:
                    worms.append(Worm(int(lab), data == lab, origin="file", scale=recorded))
        self.worms = tuple(worms)
        self.labels_layer = layer
        self._digest = None
        self._register()
        layer.events.set_data.connect(self._on_labels_changed)
        layer.events.paint.connect(self._on_labels_changed)

    def ensure_similarity_layer(self) -> Any:
        """Create the similarity-to-cursor layer if needed (under ``worms``) and return it.

        It is made on first use (live similarity switched on), not with the other maps:
        adding a layer is one of the costliest things a napari viewer does.
        """
        if self.similarity_layer is None or self.similarity_layer not in self.viewer.layers:
            from napari.layers import Image

            self.similarity_layer = Image(
                np.zeros(self.shape, np.float32),
                name=LAYER_NAMES["similarity"],
                colormap="turbo",
                contrast_limits=(0.0, 1.0),
                opacity=0.6,
                visible=False,
                metadata={OWN_LAYER: "similarity"},
                **self._transform_kwargs(),
            )
            layers = self.viewer.layers
            above = [layers.index(x) for x in (self.labels_layer, self.seeds_layer) if x in layers]
            layers.insert(min(above, default=len(layers)), self.similarity_layer)
        return self.similarity_layer

    def _ensure_seeds_layer(self) -> None:
        if self.seeds_layer is None or self.seeds_layer not in self.viewer.layers:
            with _keep_active_layer(self.viewer.layers):  # the worms layer stays active
                self.seeds_layer = self.viewer.add_points(
                    np.zeros((0, 2)),
                    name=self._edit_layer_name("seeds"),
                    size=9,
                    border_color="white",
                    border_width=0.15,
                    face_color="lime",
                    **self._transform_kwargs(),
                )
            self._seeds_shown = None
        self._update_seeds_layer()

    def _raise_edit_layers(self) -> None:
        """Put similarity, worms and seeds on top (one move, none when already there)."""
        layers = self.viewer.layers
        own = self._edit_layers()
        if own and list(layers[len(layers) - len(own) :]) != own:
            layers.move_multiple([layers.index(layer) for layer in own], len(layers))
        if self.labels_layer is not None and layers.selection.active is not self.labels_layer:
            layers.selection.active = self.labels_layer

    def _update_seeds_layer(self) -> None:
        if self.seeds_layer is None:
            return
        if self.seeds_layer not in self.viewer.layers:  # deleted by the user: back it comes
            self.seeds_layer = None
            self._seeds_shown = None
            self._ensure_seeds_layer()
        layer = self.seeds_layer
        pts: list[Point] = []
        negative: list[bool] = []
        for worm in self.worms:
            pts += worm.seeds
            negative += [False] * len(worm.seeds)
            pts += worm.negatives
            negative += [True] * len(worm.negatives)
        shown = (tuple(pts), tuple(negative))
        if shown == self._seeds_shown and len(layer.data) == len(pts):
            return  # nothing to redraw (most edits leave the seeds alone)
        data = np.array(pts, float).reshape(-1, 2)
        with same_extent(self.viewer, layer):  # seeds lie inside the image
            layer.data = data
        if pts:
            colors = np.where(np.array(negative)[:, None], _RED, _LIME)
            current = np.asarray(layer.face_color)
            if current.shape != colors.shape or not np.allclose(current, colors):
                layer.face_color = colors
        self._seeds_shown = shown

    # ---------------------------------------------------------- side-model sync
    def _register(self, digest: Any = None) -> None:
        """Remember the current worms under the digest of the current label image.

        ``digest``: the label image's :func:`state_key` when the caller knows it (an edit
        updates it from the pixels it wrote); else it is computed from the whole image.
        """
        if self.labels_layer is None:
            return
        if digest is None:
            digest = state_key(self.labels_layer.data)
        self._digest = digest
        self._digest_layer = self.labels_layer
        self._states[digest] = self.worms
        self._states.move_to_end(digest)
        while len(self._states) > self.max_states:
            self._states.popitem(last=False)

    def _on_labels_changed(self, event: Any = None) -> None:
        if self._writing:  # our own edit: :meth:`_write` keeps the digest
            return
        if self._preview_start is None:
            self.sync()
            if getattr(event, "type", None) == "set_data":
                self.set_data_syncs += 1
                # ``set_data`` comes after the data changed (undo, redo, ``layer.data =
                # ...``): the digest of that sync stays good for the next click
                return
        else:  # napari changed the layer under a live preview
            self._live_digest = None
        # napari emits ``paint`` before it writes the data (``Labels.data_setitem``): the
        # digest just taken may be the old one, so the next sync hashes the layer again
        self._digest_layer = None

    def sync(self) -> bool:
        """Bring the side model in line with the Labels layer after undo/redo or painting.

        Returns
        -------
        bool
            True if the worms changed.
        """
        layer = self.labels_layer
        if layer is None or self._writing or self._preview_start is not None:
            return False
        data = np.asarray(layer.data)
        digest = state_key(data)
        if digest != self._digest:
            known = self._states.get(digest)
            if known is not None:
                self.worms = known
            else:
                self.worms = self._reconcile(data)
                self._states[digest] = self.worms
        elif not self._reviews:
            self._digest_layer = layer
            return False
        pixels = digest != self._digest
        self._digest = digest
        self._digest_layer = layer
        reviews = self._sync_reviews()  # (says what it did in ``review_note``)
        if not reviews and not pixels:
            return False
        if not reviews:
            self.review_note = ""
        if self.selected is not None and self.worm(self.selected) is None:
            self.selected = None
        self._update_seeds_layer()
        if self.on_worms_changed is not None:
            self.on_worms_changed()
        return True

    def _sync_reviews(self) -> bool:
        """Follow napari's undo/redo of review steps (see :class:`ReviewStep`).

        A step napari moved into its redo history was undone: its worm takes the flag it
        had before; one moved back into the undo history was redone. A step in neither
        (a new edit cleared the redo history, or the history grew past napari's limit)
        is forgotten. Returns True if a flag changed.
        """
        if not self._reviews:
            return False
        layer = self.labels_layer
        done = _review_steps(getattr(layer, "_undo_history", None))
        undone = _review_steps(getattr(layer, "_redo_history", None))
        redos, undos = [], []
        for key, (step, applied) in list(self._reviews.items()):
            now = True if key in done else False if key in undone else None
            if now is None:
                del self._reviews[key]
            elif now != applied:
                self._reviews[key] = (step, now)
                (redos if now else undos).append(step)
        flags = {w.label: w.reviewed for w in self.worms}
        notes = []
        # undone: the latest first (the earliest's "before" is what stays); redone: in order
        changes = [(step, step.before, "undone") for step in reversed(undos)]
        changes += [(step, step.after, "redone") for step in redos]
        for step, flag, what in changes:
            if step.label in flags:
                flags[step.label] = flag
                state = "reviewed" if flag else "not reviewed"
                notes.append(f"review of instance {step.label} {what} ({state})")
        if not notes:
            return False
        self.worms = tuple(
            w if w.reviewed == flags[w.label] else replace(w, reviewed=flags[w.label])
            for w in self.worms
        )
        self._states[self._digest or ""] = self.worms
        note = "; ".join(notes)
        self.review_note = note[0].upper() + note[1:] + "."
        return True

    def _push_review(self, label: int, before: bool, after: bool) -> None:
        """Put a review in the worms layer's undo history (Ctrl+Z takes it back).

        The history is napari's (``Labels._save_history``, as its own edits do): one
        history for pixel edits and reviews, in the order they were made. Left out while
        a tau drag or a brush stroke groups edits into one step, and where napari's Labels
        keeps its history otherwise (K is then taken back with K).
        """
        layer = self.labels_layer
        save = getattr(layer, "_save_history", None)
        if (
            save is None
            or not hasattr(layer, "_undo_history")
            or getattr(layer, "_block_history", False)
            or self._preview_start is not None
        ):
            return
        data = layer.data
        step = ReviewStep(label, before, after, np.ndim(data), data.dtype)
        self._reviews[id(step)] = (step, True)
        digest_layer = self._digest_layer
        self._writing = True  # napari emits ``paint`` for the new step: no pixel changed
        try:
            save(step)
        finally:
            self._writing = False
        self._digest_layer = digest_layer

    def _sync_if_changed(self) -> bool:
        """:meth:`sync`, skipped when no data or paint event came since the last digest."""
        layer = self.labels_layer
        if layer is not None and self._digest is not None and self._digest_layer is layer:
            return False
        return self.sync()

    def _reconcile(self, labels: np.ndarray) -> tuple[Worm, ...]:
        """Side model for a label image painted by hand: keep untouched worms as they were."""
        current = render(self.worms, self.shape)
        changed = labels != current
        touched = set(np.unique(labels[changed]).tolist()) | set(
            np.unique(current[changed]).tolist()
        )
        touched.discard(0)
        worms = []
        for worm in self.worms:
            if worm.label not in touched:
                worms.append(worm)
                continue
            mask = labels == worm.label
            if mask.any():
                worms.append(replace(worm, mask=mask, edited=True, origin="hand"))
        present = {w.label for w in worms}
        for lab in sorted(touched - present):
            mask = labels == lab
            if mask.any():
                worms.append(Worm(int(lab), mask, edited=True, origin="hand"))
        return tuple(worms)

    # ----------------------------------------------------------------- writing
    def _write(self, worms: Iterable[Worm], preview: bool = False) -> None:
        """Replace the worms and write the change to the Labels layer as one undo step."""
        self._sync_if_changed()
        layer = self.ensure_labels_layer()
        before = {id(w): w for w in self.worms}
        self.worms = tuple(worms)
        after = {id(w): w for w in self.worms}
        changed = [w for k, w in before.items() if k not in after]
        changed += [w for k, w in after.items() if k not in before]
        box = _union_box(changed)  # only this part of the label image can change
        idx: tuple[np.ndarray, ...] = ()
        # the label image's digest before the edit, when known: updated from the pixels
        # written, the whole image is not read again (``state_key`` of 92 MB: ~30 ms)
        digest = self._known_digest(layer)
        if box is not None:
            r0, r1, c0, c1 = box
            new = render_box(self.worms, box)
            old = np.asarray(layer.data[r0:r1, c0:c1])
            rows, cols = np.nonzero(old != new)
            idx = (rows + r0, cols + c0)
            values = new[rows, cols]
            if digest is not None and rows.size:
                flat = idx[0].astype(np.int64) * layer.data.shape[1] + idx[1]
                digest = updated_key(digest, flat, old[rows, cols], values)
        self._writing = True
        try:
            if idx and idx[0].size and values.max() > np.iinfo(layer.data.dtype).max:
                layer.data = np.asarray(layer.data).astype(np.int32)  # labels past uint16
                digest = None  # another dtype: another key
            if idx and idx[0].size:
                if preview or self._preview_start is not None:
                    layer.data_setitem(idx, values)
                else:
                    with layer.block_history():
                        layer.data_setitem(idx, values)
        finally:
            self._writing = False
        if self._preview_start is None:
            self._register(digest)
        else:
            self._live_digest = digest
        seeds_before = [(w.seeds, w.negatives) for w in changed if id(w) in before]
        seeds_after = [(w.seeds, w.negatives) for w in changed if id(w) in after]
        if seeds_before != seeds_after:
            self._refresh_seeds()

    def _refresh_seeds(self) -> None:
        """Update the seeds layer at once, or through :attr:`defer` after the edit is drawn."""
        if self.defer is None:
            self._update_seeds_layer()
        elif not self._seeds_pending:
            self._seeds_pending = True
            self.defer(self._flush_seeds)

    def _flush_seeds(self) -> None:
        self._seeds_pending = False
        self._update_seeds_layer()

    def begin_preview(self) -> None:
        """Start a live edit (e.g. dragging the tau slider); ends with :meth:`end_preview`.

        All writes until :meth:`end_preview` become a single undo step. The grouping is
        napari's public ``Labels.block_history()`` context manager, entered here and left
        in :meth:`end_preview` (a drag spans many events, so it cannot be one ``with``).
        """
        if self._preview_start is not None:
            return
        self._sync_if_changed()
        layer = self.ensure_labels_layer()
        self._live_digest = self._known_digest(layer)
        self._preview_start = self.worms
        self._preview_history = layer.block_history()
        self._preview_history.__enter__()

    def end_preview(self) -> None:
        """Commit a live edit as one undo step."""
        if self._preview_start is None:
            return
        self._preview_start = None
        history, self._preview_history = self._preview_history, None
        if history is not None:
            self._writing = True  # committing emits ``paint``: our own edit, no sync
            try:
                history.__exit__(None, None, None)
            finally:
                self._writing = False
        digest, self._live_digest = self._live_digest, None
        self._register(digest)

    def _known_digest(self, layer: Any) -> Any:
        """The digest of ``layer``'s data as it is now, when known without reading it.

        Known after :meth:`_register` or :meth:`sync` until napari changes the data, and
        through the edits of a live preview (:meth:`begin_preview`); else None.
        """
        if self._preview_start is not None:
            return self._live_digest
        if self._digest is not None and self._digest_layer is layer:
            return self._digest
        return None

    def _next_label(self) -> int:
        labels = [w.label for w in self.worms]
        layer = self.labels_layer
        # in line with the side model (:meth:`sync`), the layer holds only the worms'
        # labels: its maximum is not read from the whole image then
        if layer is not None and self._known_digest(layer) is None:
            labels.append(int(np.asarray(layer.data).max()))
        return max(labels, default=0) + 1

    def _require_prediction(self) -> Prediction:
        if self.prediction is None:
            raise RuntimeError("Run the model first: this tool needs its prediction")
        return self.prediction

    def _grow(self, seeds: Sequence[Point], negatives: Sequence[Point], tau: float) -> np.ndarray:
        from ..core.grow import grow
        from ..core.pick import grow_from_segments, starts_from_segments

        prediction = self._require_prediction()
        edges = "auto" if self.refine_edges else None
        positive = [tuple(p) for p in seeds]
        negative = [tuple(p) for p in negatives] or None
        if self.click_segments and starts_from_segments(prediction):
            mask = grow_from_segments(
                prediction, positive, negative, tau=tau, edge_thresholds=edges
            )
        else:
            mask = grow(prediction, positive, tau=tau, negative=negative, edge_thresholds=edges)
        return np.asarray(mask, bool)

    def on_background(self, point: Point) -> bool:
        """Whether the model sees no worm at all at ``point`` (foreground below the floor).

        A new instance is not grown there: the background's embeddings are all alike, and
        a click on it would take the whole background (``core.grow.FG_FLOOR``).
        """
        from ..core.grow import FG_FLOOR

        prediction = self._require_prediction()
        value = float(np.nan_to_num(np.asarray(prediction.foreground)[point[0], point[1]]))
        return value < FG_FLOOR

    def _score_at(self, point: Point) -> tuple[float, int]:
        """Score and class of the best (tau, class) at one pixel (``best_tau_class`` there)."""
        if self.prediction is None:
            return 1.0, 1
        fg = np.asarray(self.prediction.class_scores[:, 1:, point[0], point[1]])  # (T, C)
        t, c = np.unravel_index(int(fg.argmax()), fg.shape)
        return float(fg[t, c]), int(c) + 1

    # ------------------------------------------------------------------- edits
    def grow_new(self, point: Point, tau: float | None = None) -> int | None:
        """Grow a new instance from a seed pixel at threshold ``tau`` (default: :attr:`tau`).

        Parameters
        ----------
        point : (int, int)
            (row, col) of the seed.
        tau : float, optional
            Similarity threshold.

        Returns
        -------
        int or None
            The new instance's label, or None if the mask was empty or the point is
            background to the model (:meth:`on_background`). When an instance under the
            click already has (nearly) this mask (IoU >= :attr:`SAME_WORM_IOU`: a click on a
            worm that **Segment all** or an earlier click made), no duplicate is added: that
            instance is selected and its label returned.
        """
        self._sync_if_changed()
        tau = self.tau if tau is None else float(tau)
        if self.on_background(point):
            return None
        mask = self._grow([point], [], tau)
        if not mask.any():
            return None
        for existing in self.worms:
            if existing.mask[point] and _iou(existing.mask, mask) >= self.SAME_WORM_IOU:
                self.select(existing.label)
                return existing.label
        score, cls = self._score_at(point)
        worm = Worm(
            self._next_label(), mask, seeds=(point,), tau=tau, score=score, cls=cls,
            edited=True, origin="click", scale=self.prediction_scale(),
        )  # fmt: skip
        self._write((*self.worms, worm))
        self.select(worm.label)
        return worm.label

    def _target(self, point: Point | None, label: int | None) -> Worm | None:
        if label is None and point is not None:
            label = self.label_at(point) or None
        if label is None:
            label = self.selected
        return self.worm(label)

    def add_seed(self, point: Point, label: int | None = None) -> int | None:
        """Add a positive seed to an instance (default: the selected one) and re-grow it.

        Returns
        -------
        int or None
            The label changed, or None when no instance is selected.
        """
        from ..core.pick import add_to_mask, starts_from_segments

        self._sync_if_changed()
        worm = self.worm(label if label is not None else self.selected)
        if worm is None:
            return None
        tau = worm.tau if worm.tau is not None else self.tau
        prediction = self._require_prediction()
        scale = worm.scale  # a correction keeps the worm's scale...
        if worm.origin != "click" and self.click_segments and starts_from_segments(prediction):
            # a worm not made by clicks (Segment all, a split, a file): its mask is its
            # state; take the piece under the click, not a whole segment
            mask = add_to_mask(prediction, worm.mask, point)
        else:
            grown = self._grow([*worm.seeds, point], worm.negatives, tau)
            mask = grown if worm.seeds else (worm.mask | grown)
            if worm.seeds or scale is None:  # ...unless grown anew from this prediction
                scale = self.prediction_scale()
        new = replace(
            worm, mask=mask, seeds=(*worm.seeds, point), tau=tau, edited=True, scale=scale
        )
        self._replace(worm, new)
        return worm.label

    def add_negative(self, point: Point, label: int | None = None) -> int | None:
        """Add a negative seed to an instance (default: the selected one) and re-grow it.

        Returns
        -------
        int or None
            The label changed, or None when no instance is selected.
        """
        self._sync_if_changed()
        worm = self.worm(label if label is not None else self.selected)
        if worm is None:
            return None
        tau = worm.tau if worm.tau is not None else self.tau
        negatives = (*worm.negatives, point)
        from ..core.pick import cut_away, starts_from_segments

        prediction = self._require_prediction()
        from_segments = self.click_segments and starts_from_segments(prediction)
        scale = worm.scale  # a correction keeps the worm's scale, unless grown anew
        if worm.seeds and (worm.origin == "click" or not from_segments):
            mask = self._grow(worm.seeds, negatives, tau)
            scale = self.prediction_scale()
        elif from_segments:
            # not made by clicks (Segment all, a split): cut along the boundary map, not by
            # embedding (the embeddings of worms the segmentation merged are merged too)
            mask = cut_away(prediction, worm.mask, point, keep=worm.seeds or None)
        else:
            from ..core.grow import similarity

            near = np.asarray(similarity(prediction, point)) >= tau
            mask = worm.mask & ~near
        new = replace(worm, mask=mask, negatives=negatives, tau=tau, edited=True, scale=scale)
        self._replace(worm, new)
        return worm.label

    def _replace(self, old: Worm, new: Worm) -> None:
        worms = [new if w is old else w for w in self.worms]
        if not new.mask.any():
            worms = [w for w in worms if w is not new]
        self._write(worms)

    def remove(self, point: Point | None = None, label: int | None = None) -> int | None:
        """Remove the instance under ``point`` (or with ``label``, or the selected one).

        Returns
        -------
        int or None
            The removed label, or None if there was nothing to remove.
        """
        worm = self._target(point, label)
        if worm is None:
            return None
        self._write([w for w in self.worms if w is not worm])
        if self.selected == worm.label:
            self.selected = None
        return worm.label

    def merge(self, a: int, b: int) -> int | None:
        """Merge instance ``b`` into instance ``a`` (union of masks and seeds).

        Returns
        -------
        int or None
            The label kept, or None if one label does not exist or they are equal.
        """
        self._sync_if_changed()
        wa, wb = self.worm(a), self.worm(b)
        if wa is None or wb is None or wa is wb:
            return None
        merged = replace(
            wa,
            mask=wa.mask | wb.mask,
            seeds=wa.seeds + wb.seeds,
            negatives=wa.negatives + wb.negatives,
            score=min(wa.score, wb.score),
            edited=True,
            reviewed=False,
        )
        self._write([merged if w is wa else w for w in self.worms if w is not wb])
        self.select(merged.label)
        return merged.label

    def split(self, p: Point, q: Point) -> tuple[int, int] | None:
        """Split the instance under ``p`` in two along the boundary map, seeded at p and q.

        A marker-controlled watershed of the boundary probability inside the instance's
        mask (flooding from the two clicks) decides which pixels go to which part.

        Returns
        -------
        (int, int) or None
            Labels of the two parts, or None if p is on background or q is not in the same
            instance.
        """
        from skimage.segmentation import watershed

        self._sync_if_changed()
        worm = self.worm(self.label_at(p)) or self.worm(self.selected)
        if worm is None or not worm.mask[p] or not worm.mask[q] or p == q:
            return None
        prediction = self._require_prediction()
        markers = np.zeros(self.shape, np.int32)
        markers[p] = 1
        markers[q] = 2
        parts = watershed(prediction.boundary, markers, mask=worm.mask)
        ma, mb = parts == 1, parts == 2
        if not ma.any() or not mb.any():
            return None
        first = replace(worm, mask=ma, seeds=(p,), negatives=(), edited=True, reviewed=False)
        second = replace(first, label=self._next_label(), mask=mb, seeds=(q,))
        worms = [first if w is worm else w for w in self.worms]
        self._write([*worms, second])
        self.select(first.label)
        return first.label, second.label

    def select(self, label: int | None) -> None:
        """Select an instance (the tau slider and seed tools act on it)."""
        self.selected = label if self.worm(label) is not None else None
        if self.selected is not None and self.labels_layer is not None:
            self.labels_layer.selected_label = self.selected

    def regrow_selected(self, tau: float, preview: bool = False) -> bool:
        """Re-grow the selected instance from its seeds at a new threshold.

        Parameters
        ----------
        tau : float
            The new threshold.
        preview : bool
            True while a slider moves (call :meth:`begin_preview` first).

        Returns
        -------
        bool
            Whether the instance changed (it needs seeds; with clicks from the automatic
            segments, only worms made by clicks are re-grown, and tau only moves the
            parts grown from the embeddings).
        """
        from ..core.pick import starts_from_segments

        self.tau = float(tau)
        worm = self.worm(self.selected)
        if worm is None or not worm.seeds or self.prediction is None:
            return False
        if worm.origin != "click" and self.click_segments:
            if starts_from_segments(self.prediction):
                return False  # its mask, not its seeds, is its state (see add_seed)
        mask = self._grow(worm.seeds, worm.negatives, self.tau)
        if not mask.any() or np.array_equal(mask, worm.mask):
            return False  # (from the segments, a first click's mask does not use tau)
        new = replace(worm, mask=mask, tau=self.tau, edited=True, scale=self.prediction_scale())
        self._write([new if w is worm else w for w in self.worms], preview=preview)
        return True

    def similarity_to(self, point: Point | None) -> np.ndarray | None:
        """Update the similarity layer with sigma(point, q) for what the canvas shows.

        The pixels q are those of the visible part of the image (:meth:`visible_window`),
        every ``step``-th row and column when zoomed out so far that a screen pixel
        covers several (the canvas shows one of them anyway); the layer is placed over
        them (its scale and translate). On a 4160 x 5568 image the whole map took
        ~160 ms to compute and as long to draw at every cursor move.

        Returns
        -------
        np.ndarray or None
            The values shown: ``similarity(point)[row0:row1:step, col0:col1:step]``.
        """
        if point is None or self.prediction is None:
            return None
        from ..core.grow import get_grower

        grower = get_grower(self.prediction)
        (r0, r1, c0, c1), step = self.visible_window()
        sim = grower.similarity_window(point, (r0, r1, c0, c1), step)
        layer = self.ensure_similarity_layer()
        base = np.asarray(self.image_layer.scale[-2:], float)
        shift = np.asarray(self.image_layer.translate[-2:], float) + base * (r0, c0)
        scale, translate = tuple(base * step), tuple(shift)
        if tuple(layer.scale[-2:]) != scale or tuple(layer.translate[-2:]) != translate:
            layer.scale, layer.translate = scale, translate
        set_layer_data(self.viewer, layer, sim)
        return sim

    def visible_window(self) -> tuple[tuple[int, int, int, int], int]:
        """The image pixels the canvas shows, and how many of them a screen pixel spans.

        From napari's ``corner_pixels`` and ``scale_factor`` of the image layer (updated
        at every draw); the whole image, step 1, when they are unknown (nothing drawn
        yet, a 3D view).

        Returns
        -------
        (int, int, int, int)
            (row0, row1, col0, col1), ends exclusive, within the image.
        int
            The step: image pixels per screen pixel, rounded down, at least 1.
        """
        h, w = self.shape
        layer = self.image_layer
        whole = ((0, h, 0, w), 1)
        try:
            corners = np.asarray(layer.corner_pixels)[:, -2:]
            factor = float(layer.scale_factor) / float(np.min(np.abs(layer.scale[-2:])))
        except (AttributeError, TypeError, ValueError, IndexError):
            return whole
        if self.viewer.dims.ndisplay != 2 or corners.shape != (2, 2) or not np.isfinite(factor):
            return whole
        r0, c0 = (max(int(v), 0) for v in corners[0])
        r1, c1 = min(int(corners[1, 0]) + 1, h), min(int(corners[1, 1]) + 1, w)
        if r1 - r0 < 2 or c1 - c0 < 2:  # nothing drawn yet (corners all 0)
            return whole
        return (r0, r1, c0, c1), max(1, int(factor))

    # ---------------------------------------------------------- automatic mode
    def auto_segment(self, method: str = "hybrid", keep_edited: bool = True, **params: Any) -> int:
        """Segment the whole image and put the result in the Labels layer (one undo step).

        Parameters
        ----------
        method : str
            ``"seeds"``, ``"boundary"`` or ``"hybrid"``
            (see :func:`napari_instseg.core.instances.segment`).
        keep_edited : bool
            Keep instances a person edited or reviewed; new instances that mostly overlap
            them are dropped.
        **params
            Passed to ``segment``.

        Returns
        -------
        int
            Number of instances after segmentation.
        """
        from ..core.instances import segment_cropped

        found = segment_cropped(self._require_prediction(), method=method, **params)
        return self.apply_segmentation(found, keep_edited, {"method": method, **params})

    def apply_segmentation(
        self,
        found: Instances | CroppedInstances,
        keep_edited: bool = True,
        method: dict | None = None,
    ) -> int:
        """Put automatically found instances in the Labels layer (one undo step).

        Parameters
        ----------
        found : Instances or CroppedInstances
            Result of ``segment``, or of ``segment_cropped`` (each worm read in its box:
            on a large image, not every full-image mask of an (N, H, W) array).
        keep_edited : bool
            Keep instances a person edited or reviewed; found instances lying mostly
            (> 50 %) on them are dropped.
        method : dict, optional
            Method and parameters, kept for provenance (see :func:`segmentation_record`).

        Returns
        -------
        int
            Number of instances after segmentation.
        """
        self.sync()
        kept = [w for w in self.worms if w.edited or w.reviewed] if keep_edited else []
        taken = np.zeros(self.shape, bool)
        for w in kept:
            taken |= w.mask
        label = max((w.label for w in kept), default=0)
        worms = list(kept)
        scale = self.prediction_scale()
        seeds = found.seeds if found.seeds is not None else None
        taus = found.taus if found.taus is not None else None
        for i in range(len(found)):
            if isinstance(found, CroppedInstances):  # each worm read in its box
                mask, area, box = _from_crop(found, i)
                r0, r1, c0, c1 = box
                overlap = np.count_nonzero(taken[r0:r1, c0:c1] & mask[r0:r1, c0:c1])
            else:
                mask = found.masks[i]
                area = mask.sum()
                overlap = taken[mask].sum() if area else 0
            if area == 0 or overlap > 0.5 * area:
                continue
            label += 1
            seed: tuple[Point, ...] = ()
            if seeds is not None and seeds[i][0] >= 0:
                seed = ((int(seeds[i][0]), int(seeds[i][1])),)
            worms.append(
                Worm(
                    label,
                    mask,
                    seeds=seed,
                    tau=None if taus is None or np.isnan(taus[i]) else float(taus[i]),
                    score=float(found.scores[i]),
                    cls=int(found.classes[i]),
                    origin="auto",
                    scale=scale,
                )
            )
            if isinstance(found, CroppedInstances):  # known: no pass over the full mask
                worms[-1].__dict__.update(area=int(area), bbox=box)
        self.last_method = dict(method or {})
        self._write(worms)
        return len(worms)

    # ------------------------------------------------------------------ review
    def mark_reviewed(self, label: int | None = None, reviewed: bool = True) -> int | None:
        """Mark an instance (default: the selected one) as reviewed (or not).

        Returns
        -------
        int or None
            The label, or None when there is no such instance.
        """
        self.sync()
        worm = self.worm(self.selected if label is None else label)
        if worm is None:
            return None
        new = replace(worm, reviewed=reviewed)
        self.worms = tuple(new if w is worm else w for w in self.worms)
        if self.labels_layer is not None:  # no pixel changes: remember the state...
            self._states[self._digest or ""] = self.worms
            if worm.reviewed != reviewed:  # ...and make it a step of the undo history
                self._push_review(worm.label, worm.reviewed, reviewed)
        return worm.label

    def next_to_review(self) -> int | None:
        """Select the least certain unreviewed instance and centre the view on it.

        Returns
        -------
        int or None
            Its label, or None when every instance is reviewed.
        """
        self.sync()
        todo = [w for w in self.worms if not w.reviewed]
        if not todo:
            return None
        worm = min(todo, key=lambda w: (w.score, w.label))
        self.select(worm.label)
        rows, cols = np.nonzero(worm.mask)
        centre = self.image_layer.data_to_world(
            [*([0] * (self.image_layer.ndim - 2)), rows.mean(), cols.mean()]
        )
        scene = getattr(self.viewer, "scene", None)  # napari >= 0.9 moved the camera
        camera = scene.camera if scene is not None else self.viewer.camera
        camera.center = tuple(np.asarray(centre)[-2:])
        return worm.label

    # ---------------------------------------------------------- measurements
    def measure(
        self, channels: dict[str, np.ndarray] | None = None, dead_channel: str | None = None
    ) -> Any:
        """Measure every instance and store the table as the Labels layer's ``features``.

        Parameters
        ----------
        channels : dict of str to np.ndarray, optional
            Other (H, W) channels of the image, e.g. ``{"w1": sytox}`` (BBBC010's
            fluorescence); each gives a ``mean_<name>`` column.
        dead_channel : str, optional
            The stain among ``channels`` whose mean calls a worm dead (the ``dead`` column;
            see :func:`napari_instseg.core.measure.measure`). None: no live/dead call.

        Returns
        -------
        pandas.DataFrame
            One row per instance, with ``label``, ``score``, ``reviewed`` and the columns of
            :func:`napari_instseg.core.measure.measure`: the image's mean is
            ``mean_intensity`` (one ``mean_intensity_<c>`` per channel), each of
            ``channels`` a ``mean_<name>``.
        """
        import pandas as pd

        from ..core.measure import measure

        self.sync()
        instances = self.instances
        image = self.image
        # the image's own mean is measure's mean_intensity (mean_intensity_<c> per channel);
        # only the other channels get a mean_<name> column
        extra = dict(channels or {})
        stain = dead_channel if dead_channel in extra else None
        table = measure(instances, image, extra, dead_channel=stain or "w1")
        if stain is None and "dead" in table:  # a channel that is no stain: no call
            table = table.drop(columns="dead")
        table = pd.DataFrame(table).reset_index(drop=True)
        worms = sorted(self.worms, key=lambda w: w.label)
        front = pd.DataFrame(
            {
                "label": [w.label for w in worms],
                "score": [w.score for w in worms],
                "reviewed": [w.reviewed for w in worms],
                "origin": [w.origin for w in worms],
            }
        )
        table = pd.concat(
            [front, table.drop(columns=[c for c in front if c in table], errors="ignore")],
            axis=1,
        )
        if self.labels_layer is not None:
            features = table.copy()
            features.insert(0, "index", features["label"])
            self.labels_layer.features = features
        return table

    # ------------------------------------------------------------------ export
    def seed_table(self) -> Any:
        """The clicks of the worms grown from clicks, one row per seed.

        Columns ``worm`` (its label), ``row``, ``col``, ``positive`` (0 for a negative
        seed) and ``tau``: the format of ``napari-instseg grow --seeds``, which grows the same
        masks again from them (worms painted by hand afterwards or made by the automatic
        segmentation are left out: their masks do not come from their seeds).

        Returns
        -------
        pandas.DataFrame
        """
        import pandas as pd

        self.sync()
        rows = []
        for worm in sorted(self.worms, key=lambda w: w.label):
            if worm.origin != "click" or not worm.seeds:
                continue
            for points, positive in ((worm.seeds, 1), (worm.negatives, 0)):
                rows += [(worm.label, int(r), int(c), positive, worm.tau) for r, c in points]
        return pd.DataFrame(rows, columns=["worm", "row", "col", "positive", "tau"])

    def to_sample(self, name: str | None = None) -> Sample:
        """The image and instances as a training :class:`~napari_instseg.core.types.Sample`.

        Reviewed flags, classes and provenance (model as ``name@sha``, segmentation method
        and every parameter used, date) are included, and
        the scale of the prediction when it was made at another one (training then
        resizes the sample by it, see :func:`~napari_instseg.core.scale.at_recorded_scale`).
        """
        self.sync()
        worms = sorted(self.worms, key=lambda w: w.label)
        instances = self.instances
        import napari_instseg

        from .io import as_source_dtype

        # the image as given: in its file's dtype when the reader recorded one (BBBC010's
        # uint16 wells, read as float32) and the values fit it exactly
        dtype = (self.image_layer.metadata.get(META) or {}).get("dtype")
        return Sample(
            image=as_source_dtype(self.image, dtype),
            masks=instances.masks,
            name=name or str(self.image_layer.name),
            reviewed=np.array([w.reviewed for w in worms], bool),
            classes=np.array([w.cls for w in worms], np.int64),
            metadata={
                "source_layer": str(self.image_layer.name),
                "source": str(
                    getattr(getattr(self.image_layer, "source", None), "path", "") or ""
                ),
                "model": model_label(self.prediction, self.model_name),
                "segmentation": self.last_method,
                "origins": [w.origin for w in worms],
                "edited": [bool(w.edited) for w in worms],
                "napari_instseg": napari_instseg.__version__,
                "exported": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                **self.scale_metadata(),
            },
        )

    def prediction_scale(self) -> float | None:
        """The scale the prediction held was made at (1 by default); None without one."""
        if self.prediction is None:
            return None
        metadata = getattr(self.prediction, "metadata", None) or {}
        return float(metadata.get("scale") or 1.0)

    def labels_scale(self) -> float | None:
        """The scale the labels were made at: what an export records.

        The scale belongs to the worms, not to the prediction shown: each worm keeps the
        scale of the prediction it was grown or segmented from, and worms read from an
        export the scale recorded there (:attr:`Worm.scale`). Running the model again,
        at any scale, changes no worm; **Segment all** (its new worms) or growing a worm
        anew from its seeds does. The labels' scale is the one most of their worms have
        (a tie goes to the worms made first: the lowest labels, e.g. the reopened ones);
        worms of unknown scale (painted by hand) do not count. When no worm has a scale,
        the prediction's (None without one).

        Returns
        -------
        float or None
        """
        counts: dict[float, int] = {}
        for worm in sorted(self.worms, key=lambda w: w.label):
            if worm.scale is not None:
                counts[worm.scale] = counts.get(worm.scale, 0) + 1
        if not counts:
            return self.prediction_scale()
        return max(counts, key=lambda s: counts[s])  # the first of equals: the earliest

    def scale_metadata(self) -> dict[str, float]:
        """``{"scale": s}`` when the labels were made at a scale other than 1.

        See :meth:`labels_scale`; training resizes the exported sample by it.
        """
        scale = self.labels_scale()
        return {"scale": scale} if scale is not None and scale != 1.0 else {}

    def scale_note(self) -> str:
        """A sentence for the export message when the scales disagree ("" when they agree).

        The worms' scales differ from each other, or from the prediction shown.
        """
        scale = self.labels_scale()
        if scale is None:
            return ""
        scales = {w.scale for w in self.worms if w.scale is not None}
        shown = self.prediction_scale()
        if len(scales) > 1:
            others = ", ".join(f"{s:g}" for s in sorted(scales - {scale}))
            return (
                f"Scale {scale:g} recorded (most worms were made at it; some at {others}); "
                "training resizes the image by it."
            )
        if shown is not None and shown != scale:
            return (
                f"Scale {scale:g} recorded: the worms were made at it (the maps shown are at "
                f"scale {shown:g}; Segment all would make them at {shown:g})."
            )
        return ""

    def export(self, root: Any, overwrite: bool = False) -> Any:
        """Write the image and instances into a training folder (``write_training_folder``).

        A new or empty folder becomes a training folder; an existing training folder is
        extended with this image (other images stay), so several corrected images can be
        exported into one folder.

        Parameters
        ----------
        root : str or Path
            The folder.
        overwrite : bool
            Replace an image of the same name in a training folder, or write into a folder
            that is not empty and not a training folder.

        Returns
        -------
        Path
            ``root``.

        Raises
        ------
        FileExistsError
            Without ``overwrite``: the training folder already holds an image of this name,
            or ``root`` is a file or a non-empty folder that is not a training folder.
        """
        from ..core.training_folder import write_training_folder

        sample = self.to_sample()
        conflict = export_conflict(root, sample.name)
        if conflict and not overwrite:
            raise FileExistsError(conflict)
        return write_training_folder(root, [sample], overwrite=overwrite)


def export_conflict(root: Any, name: str) -> str:
    """Why exporting image ``name`` into folder ``root`` would replace something ("" if not).

    Parameters
    ----------
    root : str or Path
        The folder to export into.
    name : str
        The image's name in the training folder.

    Returns
    -------
    str
        A message for the user, or "" when the export only adds files: ``root`` does not
        exist, is empty, or is a training folder without an image of that name.
    """
    from pathlib import Path

    from ..core.training_folder import MANIFEST, training_folder_names

    root = Path(root)
    if root.is_file():
        return f"{root} is a file, not a folder"
    if not root.is_dir() or not any(root.iterdir()):
        return ""
    names = training_folder_names(root)
    if (root / MANIFEST).is_file() or names:
        if name in names:
            return f"{root} already holds an image named {name!r}"
        return ""
    return f"{root} is not empty and is not a training folder"


def model_label(prediction: Any, fallback: str = "") -> str:
    """The model a prediction came from as an export records it: ``name@sha256-prefix``.

    Parameters
    ----------
    prediction : Prediction or None
        Its metadata holds the weights' ``model`` name and ``model_sha256`` (``predict``
        copies them from the weights' metadata).
    fallback : str
        The name when the prediction records none (e.g. the widget's ``shipped``).

    Returns
    -------
    str
        e.g. ``"bbbc010@6ec1e051"`` (the first 8 hex digits of the weights' sha256); the
        name alone when no hash is known, ``fallback`` when no name is.
    """
    meta = getattr(prediction, "metadata", None) or {}
    name = str(meta.get("model") or fallback or "")
    sha = str(meta.get("model_sha256") or "")
    return f"{name}@{sha[:8]}" if name and sha else name


def segmentation_record(prediction: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The method and every parameter a segmentation used, for an export's provenance.

    Follows :func:`napari_instseg.core.instances.segment`: ``"auto"`` is the model's
    ``recommended_method`` (else ``"hybrid"``), and the parameters are the method's
    defaults, overridden by those tuned for the model, overridden by ``params``. A tuned
    outline refinement is skipped for a prediction without the image contrast, so it is
    recorded as ``None`` then.

    Parameters
    ----------
    prediction : Prediction
        The prediction segmented.
    method : str
        The method asked for (``"auto"``, ``"seeds"``, ``"boundary"`` or ``"hybrid"``).
    params : dict
        The parameters passed with it.

    Returns
    -------
    dict
        ``{"method": resolved, "requested": method, "params": {...}}``.
    """
    from ..core.instances import segment_settings

    resolved, used = segment_settings(prediction, method, **params)
    return {"method": resolved, "requested": method, "params": used}
