"""The map layers' data (``napari_instseg._napari.layers``): what each map shows."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_instseg._napari.layers import embeddings_to_rgb, prediction_layers  # noqa: E402
from napari_instseg.core.oracle import prediction_from_masks  # noqa: E402
from napari_instseg.core.synthetic import make_worms  # noqa: E402


def _rgb_reference(embeddings, n_samples, seed):
    """The PCA colouring in float64: centred, projected on the sample's first three
    principal components, each scaled from its 1st to its 99th percentile, clipped."""
    d, h, w = embeddings.shape
    flat = embeddings.reshape(d, -1).T.astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.choice(flat.shape[0], size=min(n_samples, flat.shape[0]), replace=False)
    mean = flat[idx].mean(axis=0)
    if d >= 3:
        comps = np.linalg.svd(flat[idx] - mean, full_matrices=False)[2][:3]
    else:
        comps = np.eye(d)
    proj = np.zeros((flat.shape[0], 3))
    proj[:, : len(comps)] = (flat - mean) @ comps.T
    lo = np.percentile(proj[idx], 1, axis=0)
    hi = np.percentile(proj[idx], 99, axis=0)
    return np.clip((proj - lo) / np.maximum(hi - lo, 1e-6), 0, 1).reshape(h, w, 3)


@pytest.mark.parametrize("dim", [2, 3, 8])
def test_embeddings_to_rgb_colours_each_worm_by_its_principal_components(dim):
    worms = make_worms(shape=(96, 128), n_worms=4, seed=1)
    p = prediction_from_masks(worms.masks, embedding_dim=dim, noise=0.05, seed=2)
    rgb = embeddings_to_rgb(p.embeddings, n_samples=3000, seed=0)
    assert rgb.dtype == np.float32 and rgb.shape == (96, 128, 3)
    assert 0.0 <= rgb.min() and rgb.max() <= 1.0
    want = _rgb_reference(p.embeddings, 3000, 0)
    np.testing.assert_allclose(rgb, want, atol=2e-5)
    if dim == 2:
        assert not rgb[..., 2].any()  # two components: the third colour stays 0
    # each worm one colour, worms told apart (the pixels of one worm only)
    alone = worms.masks & (worms.masks.sum(axis=0) == 1)
    means = np.array([rgb[m].mean(axis=0) for m in alone])
    spread = max(rgb[m].std(axis=0).max() for m in alone)
    gaps = [np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1 :]]
    assert min(gaps) > 4 * spread


def test_map_layers_show_the_prediction_arrays_without_copies():
    """Seediness, boundary and foreground are shown from the prediction's own float32
    arrays (each a copy of the image's size before: 88 MB at 4160 x 5568)."""
    worms = make_worms(shape=(96, 128), n_worms=3, seed=0)
    p = prediction_from_masks(worms.masks, embedding_dim=4)
    data = {key: value for key, value, _ in prediction_layers(p, 0.5)}
    for key in ("seediness", "boundary", "foreground"):
        assert data[key] is getattr(p, key) or np.shares_memory(data[key], getattr(p, key))
    assert data["embeddings"].shape == (96, 128, 3)
