"""Training crops: the fast ``random_crop`` against a plain reference, data on a device.

``reference_random_crop`` is ``random_crop`` as it was before crop making was sped up
(commit a555965): a mask count per candidate window, the masks of the instances near the
crop turned to float and sampled with ``grid_sample``. The fast one must draw the same
crops from the same numpy random stream, bit for bit, on the CPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_instseg.core.synthetic import make_worms
from napari_instseg.core.train import TrainConfig, _in_window, _Item, prepare, random_crop
from napari_instseg.core.types import Sample


def reference_random_crop(
    item: _Item, config: TrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``random_crop`` as of commit a555965 (verbatim but for this docstring)."""
    size = config.crop_size
    c, h, w = item.image.shape
    # drawn only when used, so older configs keep their random stream
    aligned = config.aligned_fraction > 0 and rng.random() < config.aligned_fraction
    scale = float(np.exp(rng.uniform(np.log(config.scale_min), np.log(config.scale_max))))
    angle = math.radians(rng.uniform(-config.rotation, config.rotation))
    if aligned:
        scale, angle = 1.0, 0.0
    half = size / scale / 2  # half window in input pixels
    # candidate centres; weight by how many worms their window touches
    centres = np.stack(
        [rng.uniform(0, h, config.crop_candidates), rng.uniform(0, w, config.crop_candidates)], 1
    )
    if item.masks.shape[0]:
        counts = []
        for r, col in centres:
            r0, r1 = int(max(r - half, 0)), int(min(r + half, h))
            c0, c1 = int(max(col - half, 0)), int(min(col + half, w))
            near = _in_window(item.boxes, r0, r1, c0, c1).nonzero()[:, 0]
            counts.append(int(item.masks[near, r0:r1, c0:c1].flatten(1).any(1).sum()))
        weights = np.asarray(counts, float) + 0.5
        centre = centres[rng.choice(len(centres), p=weights / weights.sum())]
    else:
        centre = centres[0]
    half_span = (size - 1) / 2
    if aligned:  # sample at whole input pixels
        centre = np.round(np.asarray(centre) - half_span) + half_span
    flip_r = -1.0 if config.flips and rng.random() < 0.5 else 1.0
    flip_c = -1.0 if config.flips and rng.random() < 0.5 else 1.0
    # output pixel offsets from the crop centre -> input pixel coordinates
    cos, sin = math.cos(angle), math.sin(angle)
    lin = (torch.arange(size, dtype=torch.float32) - half_span) / scale
    dr = lin[:, None].expand(size, size) * flip_r
    dc = lin[None, :].expand(size, size) * flip_c
    if aligned and config.flips and rng.random() < 0.5:  # transpose
        dr, dc = dc, dr
    rows = centre[0] + cos * dr - sin * dc
    cols = centre[1] + sin * dr + cos * dc
    grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], -1)[None]
    image = F.grid_sample(
        item.image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )[0]
    # masks: nearest sampling of the part of the image the crop reads (a pixel of margin),
    # and only of the instances that reach into it
    r0, r1 = max(math.floor(rows.min()) - 1, 0), min(math.ceil(rows.max()) + 2, h)
    c0, c1 = max(math.floor(cols.min()) - 1, 0), min(math.ceil(cols.max()) + 2, w)
    near = _in_window(item.boxes, r0, r1, c0, c1).nonzero()[:, 0]
    part = item.masks[near, r0:r1, c0:c1]
    stacked = torch.cat([part.float(), item.trusted[None, r0:r1, c0:c1].float()], 0)[None]
    part_grid = torch.stack(  # the window holds the crop's centre: never empty
        [(2 * (cols - c0) + 1) / (c1 - c0) - 1, (2 * (rows - r0) + 1) / (r1 - r0) - 1], -1
    )[None]
    warped = F.grid_sample(
        stacked, part_grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    masks, trusted = warped[0, :-1] > 0.5, warped[0, -1] > 0.5
    masks = masks[masks.flatten(1).sum(1) > 0]
    # intensity jitter
    gain, bias = rng.uniform(0.8, 1.25), rng.uniform(-0.1, 0.1)
    image = image * gain + bias
    image = image + torch.from_numpy(rng.normal(0, 0.02, image.shape).astype(np.float32))
    return image, masks, trusted


@functools.cache
def _items() -> list[_Item]:
    """BBBC010-like images: touching and crossing worms, one with unreviewed instances,
    one without worms, a non-square one, a two-channel one and one with 60 overlapping
    blobs (three planes of packed masks)."""
    crowded = make_worms((120, 150), n_worms=8, length=(30, 70), width=(5, 9), seed=1)
    crossing = make_worms(
        (96, 96), n_worms=5, length=(30, 60), width=(5, 8), n_crossings=2, seed=2
    )
    unreviewed = make_worms((100, 80), n_worms=5, length=(20, 50), width=(4, 7), seed=3)
    unreviewed.reviewed = np.array([True, False, True, True, False])
    empty = make_worms(
        (64, 64), n_worms=0, length=(20, 30), width=(4, 6), n_crossings=0, n_touching=0, seed=4
    )
    two = make_worms((80, 90), n_worms=3, length=(20, 40), width=(4, 7), seed=5)
    two.image = np.stack([two.image, two.image[::-1]])
    rng = np.random.default_rng(6)
    blobs = np.zeros((60, 90, 110), bool)
    for mask in blobs:
        r, c = rng.integers(0, 80), rng.integers(0, 100)
        mask[r : r + rng.integers(2, 15), c : c + rng.integers(2, 15)] = True
    many = Sample(rng.normal(1000, 50, (90, 110)), blobs, reviewed=rng.random(60) < 0.9)
    items = [prepare(s) for s in (crowded, crossing, unreviewed, empty, many)]
    return [*items, prepare(two, in_channels=2)]


CONFIGS = {
    "default": TrainConfig(crop_size=48, crop_candidates=8),
    "wide": TrainConfig(crop_size=40, crop_candidates=3, scale_min=0.4, rotation=45.0),
    "aligned": TrainConfig(crop_size=33, aligned_fraction=0.5),
    "larger than the images": TrainConfig(crop_size=160, crop_candidates=2, flips=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_crop_draws_what_the_reference_draws(name):
    """Bit-identical image, masks and trusted map, and the same random stream after."""
    config = CONFIGS[name]
    items = _items()
    rng_new, rng_ref, picks = (np.random.default_rng(11) for _ in range(3))
    for _ in range(60):
        item = items[picks.integers(len(items))]
        image, masks, trusted = random_crop(item, config, rng_new)
        image_ref, masks_ref, trusted_ref = reference_random_crop(item, config, rng_ref)
        assert image.dtype == image_ref.dtype and torch.equal(image, image_ref)
        assert masks.dtype == masks_ref.dtype and masks.shape == masks_ref.shape
        assert torch.equal(masks, masks_ref)
        assert trusted.dtype == trusted_ref.dtype and torch.equal(trusted, trusted_ref)
    assert rng_new.random() == rng_ref.random()


def test_packed_masks_round_trip():
    from napari_instseg.core.train import pack_masks, unpack_masks

    masks = torch.from_numpy(np.random.default_rng(0).random((61, 7, 9)) < 0.5)
    planes = pack_masks(masks)
    assert planes.shape == (3, 7, 9) and planes.dtype == torch.float32
    assert planes.max() < 2**24
    assert torch.equal(unpack_masks(planes, range(61)), masks)
    assert torch.equal(unpack_masks(planes, [60, 3, 30]), masks[[60, 3, 30]])
    one = pack_masks(masks[:5])
    assert one.shape == (1, 7, 9) and torch.equal(unpack_masks(one, [4, 0]), masks[[4, 0]])
    assert pack_masks(masks[:0]).shape == (1, 7, 9)


def test_window_count_matches_reading_the_masks():
    from napari_instseg.core.train import window_count

    item = _items()[0]
    rng = np.random.default_rng(0)
    h, w = item.masks.shape[1:]
    for _ in range(300):
        r, col, half = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.2, 90)
        r0, r1 = int(max(r - half, 0)), int(min(r + half, h))
        c0, c1 = int(max(col - half, 0)), int(min(col + half, w))
        expected = int(item.masks[:, r0:r1, c0:c1].flatten(1).any(1).sum())
        assert window_count(item, r, col, half) == expected


def test_items_moved_to_a_device_keep_their_crops():
    """``_Item.to`` moves the tensors and keeps the CPU caches; crops are made on the
    item's device: with the default device set to ``meta``, any tensor made without
    ``device=`` would land there (on a GPU: a CPU tensor beside CUDA ones) and fail."""
    item = _items()[1]
    assert item.to("cpu") is item
    moved = item.to("meta")
    tensors = (moved.image, moved.masks, moved.trusted, moved.boxes)
    assert {t.device.type for t in tensors} == {"meta"}
    assert item.image.device.type == "cpu" and moved.pixels is item.pixels
    config = CONFIGS["aligned"]
    rng_meta, rng_cpu = np.random.default_rng(5), np.random.default_rng(5)
    for _ in range(10):
        with torch.device("meta"):
            crop = random_crop(item, config, rng_meta)
        assert {t.device.type for t in crop} == {"cpu"}
        for made, plain in zip(crop, random_crop(item, config, rng_cpu), strict=True):
            assert torch.equal(made, plain)


def test_training_on_the_cpu_logs_the_losses_the_reference_crops_give(tmp_path, monkeypatch):
    """Three steps of a tiny run: the same losses with the fast crops as with the old ones."""
    import csv

    import napari_instseg.core.train as train_module
    from napari_instseg.core.training_folder import write_training_folder

    samples = []
    for i, name in enumerate(["A01", "A02"]):
        sample = make_worms((96, 96), n_worms=3, length=(30, 50), width=(5, 8), seed=i)
        sample.name = name
        samples.append(sample)
    folder = write_training_folder(tmp_path / "data", samples)

    def run(out: str) -> list[dict[str, str]]:
        config = TrainConfig(
            data=[str(folder)],
            train_wells="",
            val_wells="",
            out=str(tmp_path / out),
            model={"channels": [8, 16], "embedding_dim": 4, "head_channels": 8},
            epochs=1,
            steps_per_epoch=3,
            batch_size=2,
            crop_size=48,
            n_embedding_samples=8,
            n_class_samples=4,
            lambda_start=-1.0,
            lambda_end=0.0,
            device="cpu",
            aligned_fraction=0.3,
            data_on_device=True,  # the CPU is the device: nothing changes
        )
        train_module.train(config, progress=False)
        with open(tmp_path / out / "log.csv", newline="") as handle:
            return [
                {k: v for k, v in row.items() if k.startswith("loss")}
                for row in csv.DictReader(handle)
            ]

    fast = run("fast")
    monkeypatch.setattr(train_module, "random_crop", reference_random_crop)
    assert run("reference") == fast
    assert float(fast[0]["loss_total"]) > 0


def test_data_on_device_option(tmp_path):
    from napari_instseg.core.train import data_device, train

    cuda, cpu, mps = torch.device("cuda", 0), torch.device("cpu"), torch.device("mps")
    auto = TrainConfig()
    assert auto.data_on_device == "auto"
    assert data_device(auto, cuda) == cuda  # (a torch.device needs no GPU to exist)
    assert data_device(auto, cpu) == cpu and data_device(auto, mps) == cpu
    assert data_device(TrainConfig(data_on_device=False), cuda) == cpu
    assert data_device(TrainConfig(data_on_device=True), mps) == mps
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="data_on_device"):
            data_device(TrainConfig(data_on_device=bad), cpu)
    with pytest.raises(ValueError, match="data_on_device"):
        train(TrainConfig(data_on_device="gpu", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    for value in ("auto", True, False):  # saved with the run and read back
        TrainConfig(data_on_device=value).to_toml(tmp_path / "c.toml")
        assert TrainConfig.from_toml(tmp_path / "c.toml").data_on_device == value
