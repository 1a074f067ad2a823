"""Shared fixtures.

``bbbc010_root``: the real BBBC010 training half, found at ``$NAPARI_INSTSEG_BBBC010`` or
``../shared/data/bbbc010`` beside the repository; tests that use it skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_bbbc010() -> Path | None:
    """Return the BBBC010 folder if present, else None."""
    candidates = [os.environ.get("NAPARI_INSTSEG_BBBC010"), REPO.parent / "shared/data/bbbc010"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "images").is_dir():
            return Path(candidate)
    return None


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
