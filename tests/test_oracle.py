import numpy as np
import pytest

from napari_instseg.core.oracle import prediction_from_masks, separated_vectors


def _cross(shape=(64, 64)):
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[28:36, 4:60] = True  # horizontal worm
    b[4:60, 28:36] = True  # vertical worm crossing it
    c = np.zeros(shape, bool)
    c[50:56, 40:62] = True  # separate worm
    return np.stack([a, b, c])


def test_separated_vectors_respect_min_distance():
    v = separated_vectors(20, 4, min_d2=9.0, rng=np.random.default_rng(0))
    d2 = ((v[:, None] - v[None]) ** 2).sum(-1)
    assert v.shape == (20, 4)
    assert d2[~np.eye(20, dtype=bool)].min() >= 9.0


def test_oracle_embeddings_overlap_is_mean_and_maps_are_consistent():
    masks = _cross()
    p = prediction_from_masks(masks, embedding_dim=6, seed=3)
    assert p.embeddings.shape == (6, 64, 64)
    ea, eb = p.embeddings[:, 30, 10], p.embeddings[:, 10, 30]
    np.testing.assert_allclose(p.embeddings[:, 31, 31], (ea + eb) / 2, rtol=1e-5)
    # constant within an instance, distinct between instances and background
    assert np.allclose(p.embeddings[:, 30, 50], ea)
    assert ((ea - eb) ** 2).sum() >= 16.0
    assert ((ea - p.embeddings[:, 0, 0]) ** 2).sum() >= 16.0
    np.testing.assert_array_equal(p.foreground > 0.5, masks.any(0))
    # boundary high on contours, including the crossing worm's edge inside the other worm
    assert p.boundary[28, 10] > 0.5 and p.boundary[32, 28] > 0.5
    assert p.boundary[0, 0] < 0.1 and p.boundary[32, 16] < 0.3
    # seediness: interior high, background and crossing low; best tau is 0.5
    assert p.seediness[32, 16] > 0.8
    assert p.seediness[0, 0] < 0.1 and p.seediness[32, 32] < 0.2
    tau, cls, score = p.best_tau_class()
    assert tau[32, 16] == pytest.approx(0.5) and cls[32, 16] == 1
    np.testing.assert_allclose(p.class_scores.sum(axis=1), 1.0, rtol=1e-5)


def test_oracle_noise_and_seed():
    masks = _cross()
    p0 = prediction_from_masks(masks, noise=0.0, seed=1)
    p1 = prediction_from_masks(masks, noise=0.1, seed=1)
    diff = p1.embeddings - p0.embeddings
    assert 0.07 < diff.std() < 0.13
    p2 = prediction_from_masks(masks, noise=0.1, seed=1)
    np.testing.assert_array_equal(p1.embeddings, p2.embeddings)


def test_oracle_bad_input():
    with pytest.raises(ValueError, match="masks"):
        prediction_from_masks(np.zeros((2, 3, 4, 5), bool))
    with pytest.raises(ValueError, match="noise"):
        prediction_from_masks(_cross(), noise=-1)
    with pytest.raises(ValueError, match="dimension"):
        prediction_from_masks(_cross(), embedding_dim=0)
    # no instances: all background, still a valid prediction
    p = prediction_from_masks(np.zeros((0, 16, 16), bool))
    assert p.foreground.max() == 0
