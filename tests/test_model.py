"""The network: shapes, configuration, semi-convolutional coordinates."""

from __future__ import annotations

import pytest
import torch

from napari_instseg.core.model import (
    InstSegNet,
    ModelConfig,
    add_coordinates,
    coordinate_channels,
)

TINY = {"channels": (8, 16, 32), "embedding_dim": 4, "head_channels": 8}


@pytest.mark.parametrize(
    ("extra", "size"),
    [
        ({}, (32, 48)),
        ({"embedding_dim": 7, "n_classes": 2, "taus": (0.5, 0.9)}, (16, 24)),
        ({"in_channels": 3, "semi_conv": False}, (24, 16)),
        ({"channels": (8, 16), "embedding_dim": 2}, (10, 14)),
    ],
)
def test_output_shapes(extra, size):
    cfg = ModelConfig(**{**TINY, **extra})
    model = InstSegNet(cfg).eval()
    h, w = size
    x = torch.randn(2, cfg.in_channels, h, w)
    with torch.no_grad():
        out = model(x)
    assert out["embeddings"].shape == (2, cfg.embedding_dim, h, w)
    assert out["class_logits"].shape == (2, len(cfg.taus), cfg.n_classes + 1, h, w)
    assert out["boundary_logits"].shape == (2, h, w)
    assert out["foreground_logits"].shape == (2, h, w)
    for value in out.values():
        assert torch.isfinite(value).all()


def test_divisor_and_bad_sizes():
    cfg = ModelConfig(**TINY)
    assert cfg.divisor == 4
    assert ModelConfig().divisor == 16
    model = InstSegNet(cfg)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match="multiple"):
        model(torch.randn(1, 1, 32, 33))


def test_coordinate_channels_values():
    c = coordinate_channels(3, 4, offset=(10, 20), scale=5.0)
    assert c.shape == (2, 3, 4)
    assert c[0, 2, 1].item() == pytest.approx(12 / 5)
    assert c[1, 2, 1].item() == pytest.approx(21 / 5)
    assert torch.all(c[0, :, 0] == c[0, :, 3])  # rows constant along a row


def test_add_coordinates_tile_equals_crop_of_full_map():
    """Tiling-safe: a tile at an offset gets exactly the global coordinates."""
    scale = 16.0
    full = add_coordinates(torch.zeros(1, 4, 40, 60), (0, 0), scale)
    tile = add_coordinates(torch.zeros(1, 4, 16, 24), (8, 28), scale)
    torch.testing.assert_close(tile, full[..., 8:24, 28:52], rtol=0, atol=1e-6)
    assert torch.all(full[:, 2:] == 0)  # only the first two channels move
    # a (B, 2) tensor of offsets: one per batch item
    batch = add_coordinates(torch.zeros(2, 4, 16, 24), torch.tensor([[8, 28], [0, 0]]), scale)
    torch.testing.assert_close(batch[0], full[0, :, 8:24, 28:52], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[1], full[0, :, :16, :24], rtol=0, atol=1e-6)
    # added, not replaced
    emb = torch.randn(1, 4, 16, 24)
    torch.testing.assert_close(add_coordinates(emb, (8, 28), scale) - emb, tile)


def test_semi_conv_adds_exactly_the_global_coordinates():
    torch.manual_seed(0)
    sc = InstSegNet(ModelConfig(**TINY, semi_conv=True, coord_scale=32.0)).eval()
    plain = InstSegNet(ModelConfig(**TINY, semi_conv=False)).eval()
    plain.load_state_dict(sc.state_dict())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        a = sc(x, (64, 96))["embeddings"]
        b = plain(x, (64, 96))["embeddings"]
    expected = coordinate_channels(32, 32, (64, 96), 32.0)
    torch.testing.assert_close(a[0, :2] - b[0, :2], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[0, 2:], b[0, 2:])


def test_tile_embeddings_match_whole_image_away_from_tile_edges():
    """Away from the tile border (beyond the receptive field) a tile predicted with its
    global offset gives the whole image's embeddings, coordinates included."""
    torch.manual_seed(1)
    model = InstSegNet(ModelConfig(**TINY, coord_scale=16.0)).eval()
    x = torch.randn(1, 1, 128, 128)
    r0, c0 = 32, 48  # multiples of the divisor: same pooling grid
    with torch.no_grad():
        full = model(x)["embeddings"]
        tile = model(x[..., r0 : r0 + 64, c0 : c0 + 64], (r0, c0))["embeddings"]
    m = 26  # margin beyond the receptive field radius of this small U-Net
    inner = tile[..., m:-m, m:-m]
    ref = full[..., r0 + m : r0 + 64 - m, c0 + m : c0 + 64 - m]
    torch.testing.assert_close(inner, ref, atol=1e-4, rtol=1e-4)
    # without the offset the coordinate channels would be wrong by exactly offset / scale
    with torch.no_grad():
        local = model(x[..., r0 : r0 + 64, c0 : c0 + 64])["embeddings"]
    diff = (tile - local)[0, :2]
    torch.testing.assert_close(diff[0], torch.full_like(diff[0], r0 / 16.0))
    torch.testing.assert_close(diff[1], torch.full_like(diff[1], c0 / 16.0))


def test_model_config_round_trip_and_unknown_keys():
    cfg = ModelConfig(embedding_dim=8, taus=(0.5, 0.75), channels=(4, 8), coord_scale=32.0)
    data = cfg.to_dict()
    assert data["taus"] == [0.5, 0.75] and data["channels"] == [4, 8]
    import json

    back = ModelConfig.from_dict(json.loads(json.dumps(data)))
    assert back == cfg
    assert isinstance(back.taus, tuple) and isinstance(back.channels, tuple)
    with pytest.raises(ValueError, match="embeding_dim"):
        ModelConfig.from_dict({**data, "embeding_dim": 4})
    assert ModelConfig.from_dict({}) == ModelConfig()


def test_gradients_reach_all_heads():
    model = InstSegNet(ModelConfig(**TINY))
    out = model(torch.randn(1, 1, 16, 16))
    total = sum(v.float().square().mean() for v in out.values())
    total.backward()
    for name in ("embedding_head", "class_head", "boundary_head"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_channels_last_training_gives_the_same_gradients():
    """The channels-last path re-lays the upsampling's gradient: same values, either layout."""
    torch.manual_seed(0)
    model = InstSegNet(ModelConfig(**TINY)).double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model.zero_grad()
        model.to(memory_format=layout)
        out = model(x.contiguous(memory_format=layout))
        sum((v * v).mean() for v in out.values()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, last in zip(*grads, strict=True):
        torch.testing.assert_close(plain, last)


def test_coordinates_are_added_in_float32_under_autocast():
    """bfloat16 keeps 8 mantissa bits: 641 / 256 would round to 2.5 (a 1-pixel error)."""
    low = torch.zeros(1, 3, 4, 4, dtype=torch.bfloat16)
    out = add_coordinates(low, (640, 600), 256.0)
    assert out.dtype == torch.float32
    assert float(out[0, 0, 1, 0]) == 641 / 256 and float(out[0, 1, 0, 3]) == 603 / 256
    assert float(out[0, 2].abs().max()) == 0.0
