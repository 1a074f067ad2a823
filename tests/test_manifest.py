"""The npe2 manifest: valid, and every python_name it names imports."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

MANIFEST = Path(__file__).resolve().parents[1] / "napari_instseg" / "napari.yaml"


def test_manifest_is_valid_and_named():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-instseg"
    contrib = manifest.contributions
    assert contrib.widgets and contrib.readers and contrib.writers and contrib.sample_data


@pytest.mark.parametrize(
    "python_name",
    [c.python_name for c in npe2.PluginManifest.from_file(MANIFEST).contributions.commands],
)
def test_every_python_name_imports(python_name):
    module, _, attr = python_name.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    assert callable(obj)


def test_entry_point_points_at_manifest():
    text = (MANIFEST.parents[1] / "pyproject.toml").read_text()
    assert 'napari-instseg = "napari_instseg:napari.yaml"' in text
