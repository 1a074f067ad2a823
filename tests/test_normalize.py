"""Input normalisation: percentile scaling and the flat-field channel."""

import numpy as np
import pytest

from napari_instseg.core.model import InstSegNet, ModelConfig
from napari_instseg.core.normalize import flatfield, model_input
from napari_instseg.core.predict import predict


def _vignetted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark rim and bright centre with two identical dark dots, one in each."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:128, :128]
    light = 1000 * np.exp(-((rr - 64) ** 2 + (cc - 64) ** 2) / (2 * 25**2)) + 50
    dots = np.zeros((128, 128), bool)
    dots[60:68, 60:68] = True  # centre
    dots[8:16, 60:68] = True  # rim
    image = light * np.where(dots, 0.6, 1.0) + rng.normal(0, 1, light.shape)
    return image[None].astype(np.float32), dots


def test_flatfield_equalises_contrast_across_illumination():
    image, dots = _vignetted()
    flat = flatfield(image, sigma=8)[0]
    centre = flat[62:66, 62:66].mean() / flat[62:66, 72:76].mean()
    rim = flat[10:14, 62:66].mean() / flat[10:14, 72:76].mean()
    # in the raw image the rim dot's absolute contrast is several times weaker than the centre's;
    # after flat-field correction both dots are dark by a similar factor
    raw = image[0]
    assert raw[62:66, 72:76].mean() - raw[62:66, 62:66].mean() > 3 * (
        raw[10:14, 72:76].mean() - raw[10:14, 62:66].mean()
    )
    assert centre < 0.85 and rim < 0.85
    assert abs(centre - rim) < 0.15


def test_model_input_channels_and_errors():
    image, _ = _vignetted()
    assert model_input(image, "percentile").shape == (1, 128, 128)
    both = model_input(image, "flatfield", flatfield_sigma=8)
    assert both.shape == (2, 128, 128) and both.dtype == np.float32
    np.testing.assert_allclose(both[0], model_input(image, "percentile")[0])
    with pytest.raises(ValueError, match="normalisation"):
        model_input(image, "zscore")
    with pytest.raises(ValueError, match="input_norm"):
        ModelConfig(input_norm="zscore")
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model_input(bad, "flatfield")


def test_flatfield_model_predicts_single_channel_image():
    config = ModelConfig(channels=(8, 8, 8), embedding_dim=4, input_norm="flatfield")
    model = InstSegNet(config)
    assert config.network_channels == 2
    image, _ = _vignetted()
    pred = predict(image[0], model, device="cpu")
    assert pred.embeddings.shape == (4, 128, 128)
    assert np.isfinite(pred.boundary).all()
