"""Shared fixtures.

``bbbc010_root``: the real BBBC010 training half, found at ``$NAPARI_INSTSEG_BBBC010`` or
``../shared/data/bbbc010`` beside the repository; tests that use it skip when it is absent.
``padded_tile`` and ``mosaic``: a synthetic prediction with merged crossings, and a
function tiling it into a large image (the large-image tests of segment and of clicks).
``load_benchmark``: a function importing a script of ``benchmarks/`` as a module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TILE_PAD = 6  # background around the padded tile, so that no worm touches its edge


def find_bbbc010() -> Path | None:
    """Return the BBBC010 folder if present, else None."""
    candidates = [os.environ.get("NAPARI_INSTSEG_BBBC010"), REPO.parent / "shared/data/bbbc010"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "images").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def load_benchmark():
    """Return a function that imports ``benchmarks/<name>.py`` as a module."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def bbbc010_root() -> Path:
    root = find_bbbc010()
    if root is None:
        pytest.skip(
            "BBBC010 data not found (set NAPARI_INSTSEG_BBBC010 or ../shared/data/bbbc010)"
        )
    return root


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """Keep torch to the machine's cores so parallel work does not oversubscribe."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    # OMP_NUM_THREADS (e.g. 1 beside a running training job) wins: two threads fighting a
    # busy machine make small convolutions ~20x slower than one thread
    limit = int(os.environ.get("OMP_NUM_THREADS") or 2)
    torch.set_num_threads(max(1, min(2, limit, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _private_prediction_cache(tmp_path_factory):
    """The widget's disk cache goes to a temporary folder, never the user's ~/.cache."""
    if "NAPARI_INSTSEG_CACHE" not in os.environ:
        os.environ["NAPARI_INSTSEG_CACHE"] = str(tmp_path_factory.mktemp("prediction-cache"))
    yield


@pytest.fixture(scope="session")
def padded_tile():
    """A synthetic prediction (172 x 212) whose crossings have no boundary, padded.

    7 worms with 2 crossings and 2 touching pairs (``make_worms`` seed 0), an oracle
    prediction of them with the boundary taken away where worms overlap (merged segments
    that the untangling must cut), the image's contrast, and ``TILE_PAD`` pixels of
    background all around.
    """
    import dataclasses

    import numpy as np

    from napari_instseg.core.edges import local_contrast
    from napari_instseg.core.oracle import prediction_from_masks
    from napari_instseg.core.synthetic import make_worms
    from napari_instseg.core.types import Prediction

    s = make_worms((160, 200), n_worms=7, length=(60, 100), n_crossings=2, n_touching=2, seed=0)
    p = prediction_from_masks(s.masks, embedding_dim=4, seed=1)
    boundary = np.where(s.masks.sum(axis=0) > 1, 0.0, p.boundary * 0.3).astype(np.float32)
    p = dataclasses.replace(p, boundary=boundary, contrast=local_contrast(s.image))

    def pad(a, value: float = 0.0):
        width = [(0, 0)] * (a.ndim - 2) + [(TILE_PAD, TILE_PAD), (TILE_PAD, TILE_PAD)]
        return np.pad(a, width, constant_values=value)

    return Prediction(
        embeddings=pad(p.embeddings),
        seediness=pad(p.seediness),
        class_scores=pad(p.class_scores),
        boundary=pad(p.boundary),
        foreground=pad(p.foreground),
        taus=p.taus,
        contrast=pad(p.contrast, 1.0),
    )


@pytest.fixture(scope="session")
def mosaic():
    """``mosaic(prediction, rows, cols)``: the prediction repeated rows x cols times."""
    import numpy as np

    from napari_instseg.core.types import Prediction

    def tiled(p, rows: int, cols: int):
        def block(a):
            return np.tile(a, (1,) * (a.ndim - 2) + (rows, cols))

        return Prediction(
            embeddings=block(p.embeddings),
            seediness=block(p.seediness),
            class_scores=block(p.class_scores),
            boundary=block(p.boundary),
            foreground=block(p.foreground),
            taus=p.taus,
            contrast=None if p.contrast is None else block(p.contrast),
            metadata=dict(p.metadata),
        )

    return tiled
