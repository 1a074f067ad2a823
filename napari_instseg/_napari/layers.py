"""Turn a :class:`~napari_instseg.core.types.Prediction` into napari layer data.

Functions here return plain arrays and keyword dictionaries (no napari import), so they
are cheap to test; :class:`~napari_instseg._napari.session.Session` adds the layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.types import Prediction

#: Metadata key marking the map layers the plugin creates (never offered as an image).
OWN_LAYER = "napari_instseg_layer"

#: Names of the layers the plugin creates; one place so the widget, docs and tests agree.
LAYER_NAMES: dict[str, str] = {
    "embeddings": "embeddings (PCA RGB)",
    "seediness": "seediness",
    "class_score": "mask score",
    "boundary": "boundary",
    "foreground": "foreground",
    "similarity": "similarity to cursor",
    "seeds": "seeds",
    "worms": "worms",
}


def embeddings_to_rgb(embeddings: np.ndarray, n_samples: int = 20000, seed: int = 0) -> np.ndarray:
    """Project (D, H, W) embeddings onto their first three principal components as RGB.

    As in Fathi et al. (2017, fig. 3): pixels of one instance get one colour, touching
    instances get different colours. Each component is scaled so its 1st and 99th
    percentiles map to 0 and 1.

    Parameters
    ----------
    embeddings : np.ndarray
        (D, H, W) float embeddings.
    n_samples : int
        Number of random pixels used to fit the PCA (the projection uses all pixels).
    seed : int
        Seed of the pixel sampling, so the colours are reproducible.

    Returns
    -------
    np.ndarray
        (H, W, 3) float32 in [0, 1].
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 3:
        raise ValueError(f"embeddings must be (D, H, W), got shape {emb.shape}")
    d, h, w = emb.shape
    flat = emb.reshape(d, -1).T  # (HW, D), a view
    rng = np.random.default_rng(seed)
    idx = rng.choice(flat.shape[0], size=min(n_samples, flat.shape[0]), replace=False)
    sample = flat[idx]
    mean = sample.mean(axis=0)
    if d >= 3:
        _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
        comps = vt[:3].astype(np.float32)
    else:
        comps = np.eye(d, dtype=np.float32)
    # projected, then centred: no centred (HW, D) copy of the embeddings (1.4 GB at
    # 4160 x 5568); (HW, 3) float32 throughout
    rgb = np.zeros((flat.shape[0], 3), np.float32)
    k = comps.shape[0]
    np.matmul(flat, comps.T, out=rgb[:, :k])
    rgb[:, :k] -= (mean @ comps.T).astype(np.float32)
    lo = np.percentile(rgb[idx], 1, axis=0).astype(np.float32)
    hi = np.percentile(rgb[idx], 99, axis=0).astype(np.float32)
    rgb -= lo
    rgb /= np.maximum(hi - lo, np.float32(1e-6))
    np.clip(rgb, 0, 1, out=rgb)
    return rgb.reshape(h, w, 3)


def class_score_at(prediction: Prediction, tau: float) -> tuple[np.ndarray, float]:
    """Foreground mask score at the threshold of ``prediction.taus`` nearest to ``tau``.

    Parameters
    ----------
    prediction : Prediction
        The network outputs.
    tau : float
        A similarity threshold in (0, 1).

    Returns
    -------
    score : np.ndarray
        (H, W) float32, max over foreground classes of ``class_scores[t]``.
    tau_used : float
        The threshold of ``prediction.taus`` that was shown.
    """
    taus = np.asarray(prediction.taus, dtype=np.float32)
    t = int(np.abs(taus - tau).argmin())
    score = prediction.class_scores[t, 1:].max(axis=0)  # a new array: no second copy
    return score.astype(np.float32, copy=False), float(taus[t])


#: How each map layer looks (``viewer.add_image`` keyword arguments), in stacking order.
#: Secondary maps are hidden by default.
MAP_LAYER_STYLE: dict[str, dict[str, Any]] = {
    "embeddings": {"rgb": True, "visible": False, "opacity": 0.8, "blending": "translucent"},
    "seediness": {
        "colormap": "inferno",
        "contrast_limits": (0.0, 1.0),
        "visible": False,
        "opacity": 0.7,
        "blending": "additive",
    },
    "class_score": {
        "colormap": "viridis",
        "contrast_limits": (0.0, 1.0),
        "visible": False,
        "opacity": 0.7,
        "blending": "translucent",
    },
    "boundary": {
        "colormap": "magenta",
        "contrast_limits": (0.0, 1.0),
        "visible": False,
        "blending": "additive",
    },
    "foreground": {
        "colormap": "green",
        "contrast_limits": (0.0, 1.0),
        "visible": False,
        "opacity": 0.5,
        "blending": "additive",
    },
}


def prediction_layers(prediction: Prediction, tau: float = 0.5) -> list[tuple[str, Any, dict]]:
    """Layer data for every map of a prediction, in the order they should be stacked.

    Parameters
    ----------
    prediction : Prediction
        The network outputs.
    tau : float
        The threshold whose class scores are shown.

    Returns
    -------
    list of (key, data, kwargs)
        ``key`` is a key of :data:`LAYER_NAMES`; ``kwargs`` go to ``viewer.add_image``
        (:data:`MAP_LAYER_STYLE`, plus the threshold shown in the mask score's metadata).
    """
    score, tau_used = class_score_at(prediction, tau)
    data = {
        "embeddings": embeddings_to_rgb(prediction.embeddings),
        # the prediction's own arrays when float32 (a copy each: 88 MB at 4160 x 5568)
        "seediness": np.asarray(prediction.seediness, np.float32),
        "class_score": score,
        "boundary": np.asarray(prediction.boundary, np.float32),
        "foreground": np.asarray(prediction.foreground, np.float32),
    }
    layers = []
    for key, style in MAP_LAYER_STYLE.items():
        kwargs = dict(style)
        if key == "class_score":
            kwargs["metadata"] = {"tau": tau_used}
        layers.append((key, data[key], kwargs))
    return layers


def empty_map_layers(shape: tuple[int, int]) -> list[tuple[str, Any, dict]]:
    """Layer data of the map layers before any prediction: zeros of the image's shape.

    The widget adds these (hidden) when an image is chosen, so that the model's results
    only replace layer data: adding a napari layer costs 0.1-0.2 s of the GUI thread.

    Parameters
    ----------
    shape : tuple of int
        (H, W) of the image.

    Returns
    -------
    list of (key, data, kwargs)
        As :func:`prediction_layers`.
    """
    h, w = (int(v) for v in shape)
    layers = []
    for key, style in MAP_LAYER_STYLE.items():
        data = np.zeros((h, w, 3) if style.get("rgb") else (h, w), np.float32)
        layers.append((key, data, dict(style)))
    return layers


def class_score_name(tau: float) -> str:
    """Layer name of the mask score map shown for threshold ``tau``."""
    return f"{LAYER_NAMES['class_score']} (tau={tau:.2f})"


def real_viewer(viewer: Any) -> Any:
    """The viewer behind napari's ``PublicOnlyProxy`` (what a Plugins-menu widget gets).

    Through the proxy every ``viewer.layers[name]`` is a new wrapper object, so layers
    could not be told apart by identity (the widget keeps one session per image layer
    and compares its own layers with the ones in events) and the speed-ups in
    ``session.py`` that use napari's private switches warned on every edit.
    """
    return getattr(viewer, "__wrapped__", viewer)
