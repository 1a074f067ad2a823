"""Novotny et al.'s identical-dots check: semi-convolutional embeddings separate identical
instances that a plain (translation-equivariant) network cannot.

The training and measuring code is shared with ``benchmarks/semiconv_dots.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "semiconv_dots.py"


@pytest.fixture(scope="module")
def dots():
    spec = importlib.util.spec_from_file_location("semiconv_dots", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dots_image(dots):
    image, masks, centres = dots.make_dots(64, 3, 4.0)
    assert image.shape == (1, 1, 64, 64) and masks.shape == (9, 64, 64)
    areas = masks.sum((1, 2))
    assert (areas == areas[0]).all() and areas[0] > 40  # identical discs
    assert masks.sum(0).max() == 1  # disjoint
    assert torch.equal(image[0, 0] > 0, masks.any(0))
    r, c = centres[4]
    assert masks[4, r, c]


def test_separation_metric(dots):
    _, masks, centres = dots.make_dots(64, 3, 4.0)
    # ideal embeddings: one far-apart vector per disc, background elsewhere
    emb = torch.zeros((2, 64, 64))
    emb[1] = 100.0
    for i, m in enumerate(masks):
        emb[0, m] = 5.0 * i
        emb[1, m] = 0.0
    ideal = dots.separation(emb, masks, centres)
    assert ideal["grow_iou"] == pytest.approx(1.0)
    assert ideal["pairs_separated"] == 1.0
    collapsed = dots.separation(torch.zeros((2, 64, 64)), masks, centres)
    assert collapsed["pairs_separated"] == 0.0
    assert collapsed["grow_iou"] == pytest.approx(float(masks[0].sum()) / 64**2)


def test_semi_conv_separates_identical_dots(dots):
    plain = dots.run_dots(semi_conv=False, steps=120, seed=0)
    semi = dots.run_dots(semi_conv=True, steps=120, seed=0)
    # plain convolutions give every disc the same embedding: they all merge
    assert plain["pairs_separated"] < 0.2
    assert plain["grow_iou"] < 0.2
    # the same network with global coordinates tells them apart
    assert semi["pairs_separated"] > 0.9
    assert semi["grow_iou"] > 0.6
    assert semi["grow_iou"] > plain["grow_iou"] + 0.4
    assert semi["final_loss"] < plain["final_loss"]
