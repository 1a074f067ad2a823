"""The public API of issue 4, as the top-level package offers it.

``napari_instseg.load_model(path=None)``, ``predict(image, model=None, device="auto")``,
``segment(prediction, method=...)``, ``grow(prediction, seeds, tau, negative=None, ...)``,
``similarity(prediction, pixel)`` and ``Instances``: the names, their leading parameters
and defaults, the shipped model behind ``model=None``, and the fields of what they return.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

import napari_instseg as nis
from napari_instseg.core import grow as grow_module
from napari_instseg.core import instances, predict, types, weights


def _leading(func, n):
    """The first ``n`` parameters as (name, default) pairs (``empty`` when required)."""
    params = list(inspect.signature(func).parameters.values())[:n]
    return [(p.name, p.default) for p in params]


def test_the_issue_names_are_the_core_functions():
    assert nis.load_model is weights.load_model
    assert nis.predict is predict.predict
    assert nis.segment is instances.segment
    assert nis.grow is grow_module.grow
    assert nis.similarity is grow_module.similarity
    assert nis.Instances is types.Instances
    assert nis.Prediction is types.Prediction
    assert {"load_model", "predict", "segment", "grow", "similarity", "Instances"} <= set(
        nis.__all__
    )


def test_the_issue_signatures():
    empty = inspect.Parameter.empty
    assert _leading(nis.load_model, 1) == [("path", None)]
    assert _leading(nis.predict, 3) == [("image", empty), ("model", None), ("device", "auto")]
    segment = inspect.signature(nis.segment).parameters
    assert list(segment)[:2] == ["prediction", "method"]
    assert segment["params"].kind is inspect.Parameter.VAR_KEYWORD
    assert _leading(nis.grow, 4) == [
        ("prediction", empty),
        ("seeds", empty),
        ("tau", 0.5),
        ("negative", None),
    ]
    assert _leading(nis.similarity, 2) == [("prediction", empty), ("pixel", empty)]


def test_importing_the_package_does_not_import_torch():
    code = "import sys, napari_instseg as n; n.Instances; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def shipped():
    if not weights.shipped_weights_path().is_file():
        pytest.skip("no shipped weights")
    return nis.load_model()


def test_predict_without_a_model_is_the_shipped_model(shipped):
    """``predict(image)`` (model=None, device="auto") runs the weights ``load_model()``
    loads, and the Prediction has the issue's fields and shapes."""
    from napari_instseg.core.synthetic import sample_worms

    image = sample_worms().image[200:296, 300:420]
    assert shipped.source == str(weights.shipped_weights_path())
    default = nis.predict(image)
    explicit = nis.predict(image, shipped, device="auto")
    h, w = image.shape
    d, t = shipped.config.embedding_dim, len(shipped.config.taus)
    c = shipped.config.n_classes
    assert default.embeddings.shape == (d, h, w)
    assert default.seediness.shape == default.boundary.shape == default.foreground.shape == (h, w)
    assert default.class_scores.shape == (t, c + 1, h, w)
    assert default.metadata["model_sha256"] == shipped.metadata["sha256"]
    for name in ("embeddings", "seediness", "class_scores", "boundary", "foreground"):
        np.testing.assert_array_equal(getattr(default, name), getattr(explicit, name))

    # and what segment, grow and similarity give back for it
    found = nis.segment(default, method="boundary")
    n = len(found)
    assert found.masks.shape == (n, h, w) and found.masks.dtype == bool
    assert found.scores.shape == found.classes.shape == (n,)
    labels = found.to_labels()
    assert labels.shape == (h, w) and labels.max() <= n
    pixel = (h // 2, w // 2)
    assert nis.similarity(default, pixel).shape == (h, w)
    mask = nis.grow(default, [pixel], 0.5, negative=None)
    assert mask.shape == (h, w) and mask.dtype == bool and mask[pixel]
