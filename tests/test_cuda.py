"""The GPU code paths, run on a real GPU: skipped on machines without one.

These tests only run where ``torch.cuda.is_available()`` (and the MPS test where Apple's
MPS is): training a few steps with bfloat16 mixed precision, resuming, fine-tuning,
prediction with tiles and test-time augmentation, a window of batch prediction, the
losses on an empty crop, and CPU against GPU predictions of the shipped model. No
network access or BBBC010 data is needed (synthetic worms).

``benchmarks/gpu_check.py`` runs them and times training and prediction; run it once on a
machine with a GPU. To dry-run this file's code on the CPU (the GPU is then the CPU, so
the comparisons are trivial), set ``NAPARI_INSTSEG_GPU_TEST_DEVICE=cpu``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_instseg.core.synthetic import make_worms

#: the device under test: CUDA, or what the environment variable names (a dry run)
GPU = os.environ.get("NAPARI_INSTSEG_GPU_TEST_DEVICE") or "cuda"

pytestmark = pytest.mark.skipif(
    GPU == "cuda" and not torch.cuda.is_available(), reason="no CUDA GPU on this machine"
)

TINY_MODEL = {"channels": [8, 16, 32], "embedding_dim": 8, "head_channels": 8}

#: largest difference of a probability map between the CPU (float32) and the GPU. A
#: float32 prediction runs without TF32 (core.device.exact_float32): 1.2e-6 on an H200,
#: where cuDNN's TF32 default had moved the maps by 0.023 (mean 0.003); bfloat16 autocast
#: moved them by at most 0.063 (docs/benchmarks.md, session 32)
MAP_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.12}


@pytest.fixture(scope="module")
def gpu() -> torch.device:
    from napari_instseg.core.device import get_device

    device = get_device(GPU)
    assert device.type == GPU.split(":")[0]
    if GPU == "cuda":
        assert get_device("auto").type == "cuda"  # auto must not fall back to the CPU
    return device


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A training folder of three synthetic 128 x 128 images, A01 to A03."""
    from napari_instseg.core.training_folder import write_training_folder

    samples = []
    for i, name in enumerate(["A01", "A02", "A03"]):
        sample = make_worms((128, 128), n_worms=4, length=(30, 60), width=(5, 8), seed=i)
        sample.name = name
        samples.append(sample)
    return write_training_folder(tmp_path_factory.mktemp("gpu") / "data", samples)


def _config(folder: Path, out: Path, device: torch.device, **kw):
    from napari_instseg.core.train import TrainConfig

    base = {
        "data": [str(folder)],
        "train_wells": "A01-A02",
        "val_wells": "A03",
        "out": str(out),
        "model": dict(TINY_MODEL),
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "crop_size": 64,
        "n_embedding_samples": 8,
        "n_class_samples": 4,
        "lambda_start": -1.0,  # the classification loss (with its sampled targets) from step 1
        "lambda_end": 0.0,
        "val_every": 1,
        "crop_candidates": 2,
        "contrast_weight": 0.1,
        "attraction_weight": 0.1,
        "boundary_contact_weight": 3.0,
        "device": str(device),
        "amp": True,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_losses_of_an_empty_crop_stay_on_the_gpu(gpu):
    from napari_instseg.core import losses as L
    from napari_instseg.core.train import TrainConfig, training_loss

    emb = torch.randn(4, 32, 32, device=gpu, requires_grad=True)
    empty = torch.zeros((0, 32, 32), dtype=torch.bool, device=gpu)
    g = torch.Generator().manual_seed(0)
    idx, targets = L.grown_mask_targets(emb, empty, (0.5, 0.8), 3, 5, generator=g)
    assert idx.device.type == targets.device.type == gpu.type and targets.shape == (2, 5)
    outputs = {
        "embeddings": emb[None],
        "class_logits": torch.randn(1, 2, 2, 32, 32, device=gpu),
        "boundary_logits": torch.randn(1, 32, 32, device=gpu),
        "foreground_logits": torch.randn(1, 32, 32, device=gpu),
    }
    trusted = torch.ones(1, 32, 32, dtype=torch.bool, device=gpu)
    trusted[0, :4] = False
    config = TrainConfig(contrast_weight=0.1, attraction_weight=0.1, boundary_contact_weight=2.0)
    terms = training_loss(outputs, [empty], trusted, config, (0.5, 0.8), 0.2, g)
    assert all(v.device.type == gpu.type for v in terms.values())
    terms["total"].backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_grown_overlaps_on_the_gpu_count_as_on_the_cpu(gpu):
    """The classification targets' grown masks: one block and one comparison for all the
    limits on a GPU, blocks of 4096 pixels on the CPU; the same counts."""
    import math

    from napari_instseg.core import losses as L

    g = torch.Generator().manual_seed(5)
    centres = torch.randn(8, 16, generator=g)
    which = torch.randint(8, (256 * 256,), generator=g)
    pixels = centres[which] + 0.15 * torch.randn(256 * 256, 16, generator=g)
    seeds = pixels[torch.randint(len(pixels), (60,), generator=g)]
    members = torch.stack([(which == k).float() for k in range(6)])
    limits = [math.log(2.0 / tau - 1.0) for tau in (0.25, 0.5, 0.75, 0.9)]
    cpu_inter, cpu_area = L.grown_overlaps(seeds, pixels, members, limits)
    inter, area = L.grown_overlaps(seeds.to(gpu), pixels.to(gpu), members.to(gpu), limits)
    assert cpu_area.max() > 1000  # masks that reach far beyond their seed
    # the same pixels, but for the few within float rounding of a limit
    assert (area.cpu() - cpu_area).abs().max() <= 2
    assert (inter.cpu() - cpu_inter).abs().max() <= 2


def test_training_data_and_crops_on_the_gpu(gpu, folder, tmp_path, monkeypatch):
    """``data_on_device``: two training steps whose crops are cut on the GPU from data
    kept there, and crops of the same draws as on the CPU (up to float rounding)."""
    import napari_instseg.core.train as train_module
    from napari_instseg.core.train import TrainConfig, prepare

    made = []
    real = train_module.random_crop

    def spy(item, config, rng):
        crop = real(item, config, rng)
        made.append(
            {item.image.device.type, item.packed.device.type} | {t.device.type for t in crop}
        )
        return crop

    monkeypatch.setattr(train_module, "random_crop", spy)
    config = _config(folder, tmp_path / "run", gpu, data_on_device=True)
    assert train_module.data_device(config, gpu) == gpu
    train_module.train(config, progress=False)
    assert len(made) == 4 and all(devices == {gpu.type} for devices in made)
    monkeypatch.undo()

    sample = make_worms((128, 128), n_worms=4, length=(30, 60), width=(5, 8), seed=7)
    item = prepare(sample)
    moved = item.to(gpu)
    assert moved.image.device.type == gpu.type and item.image.device.type == "cpu"
    config = TrainConfig(crop_size=64, crop_candidates=4, aligned_fraction=0.3)
    rng_cpu, rng_gpu = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(20):
        image, masks, trusted = real(item, config, rng_cpu)
        image_gpu, masks_gpu, trusted_gpu = real(moved, config, rng_gpu)
        assert torch.allclose(image, image_gpu.cpu(), atol=1e-4)
        # nearest sampling may round a pixel exactly halfway between two the other way
        assert (trusted != trusted_gpu.cpu()).float().mean() < 1e-3
        if masks.shape == masks_gpu.shape:
            assert (masks.any(0) != masks_gpu.any(0).cpu()).float().mean() < 1e-3
    assert rng_cpu.random() == rng_gpu.random()  # the same draws


def test_train_resume_predict_finetune_on_the_gpu(gpu, folder, tmp_path):
    """End to end on the GPU: two steps with mixed precision, a resumed epoch, prediction
    with tiles and tta 8, one fine-tuning step, a batch window."""
    from napari_instseg.core.batch import predict_window
    from napari_instseg.core.device import training_autocast_dtype
    from napari_instseg.core.finetune import finetune
    from napari_instseg.core.predict import predict
    from napari_instseg.core.train import train
    from napari_instseg.core.weights import load_model, read_metadata

    out = tmp_path / "run"
    amp = training_autocast_dtype(gpu, amp=True)
    if gpu.type == "cuda" and torch.cuda.get_device_capability(gpu)[0] >= 8:
        assert amp is torch.bfloat16  # an H100 / H200 / A100 trains in mixed precision
    best = train(_config(folder, out, gpu), progress=False)
    meta = read_metadata(best)
    hardware = meta["training"]["hardware"]
    if gpu.type == "cuda":
        assert "(CUDA)" in hardware, hardware  # not silently on the CPU
    assert np.isfinite(meta["metrics"]["val_grow_iou"])
    # resume: the checkpoint's optimiser state goes back onto the GPU
    train(_config(folder, out, gpu, epochs=2), progress=False)
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 3  # header and two epochs
    model = load_model(best, device=gpu)
    assert next(model.parameters()).device.type == gpu.type
    assert all(p.dtype == torch.float32 for p in model.parameters())

    image = make_worms((200, 300), n_worms=5, seed=5).image
    whole = predict(image, model, gpu, tta=8)
    tiled = predict(image, model, gpu, tile_size=128, halo=32, tta=8)
    assert whole.metadata["device"].startswith(gpu.type) and tiled.metadata["tiles"] == 6
    assert whole.embeddings.dtype == np.float32 and np.isfinite(whole.embeddings).all()
    for name in ("boundary", "foreground"):
        assert np.isfinite(getattr(tiled, name)).all()
    window = predict_window(
        np.zeros((model.config.network_channels, 64, 96), np.float32), model, gpu, (32, 64), tta=2
    )
    assert window.shape == (64, 96)

    version = finetune(
        [folder],
        best,
        steps=1,
        batch_size=1,
        crop_size=64,
        val_names=["A03"],
        out=tmp_path / "ft",
        device=gpu,
        replay=None,
    )
    ft_meta = read_metadata(version.path)
    if gpu.type == "cuda":
        assert "(CUDA)" in ft_meta["training"]["hardware"]


def test_shipped_model_agrees_on_cpu_and_gpu(gpu):
    """The shipped model's maps of one synthetic 520 x 696 image on the CPU (float32) and on
    the GPU, in float32 and in the default precision (bfloat16 on GPUs that have it)."""
    from napari_instseg.core.instances import segment
    from napari_instseg.core.predict import predict
    from napari_instseg.core.weights import load_model

    sample = make_worms((520, 696), n_worms=12, seed=1)
    cpu = predict(sample.image, load_model(None), "cpu", precision="float32")
    model = load_model(None, device=gpu)
    for precision in ("float32", "auto"):
        on_gpu = predict(sample.image, model, gpu, precision=precision)
        used = on_gpu.metadata["precision"]
        for name in ("boundary", "foreground"):
            diff = np.abs(getattr(on_gpu, name) - getattr(cpu, name))
            assert diff.max() <= MAP_TOLERANCE[used], (precision, name, diff.max())
            assert diff.mean() <= MAP_TOLERANCE[used] / 10, (precision, name, diff.mean())
        scale = np.abs(cpu.embeddings).mean()
        assert np.abs(on_gpu.embeddings - cpu.embeddings).mean() <= 0.02 * scale + 1e-3
        found = len(segment(on_gpu, "boundary"))
        assert abs(found - len(segment(cpu, "boundary"))) <= 1
    # tta 8 on the GPU: the same averaging as on the CPU
    cpu8 = predict(sample.image, load_model(None), "cpu", tta=8, precision="float32")
    gpu8 = predict(sample.image, model, gpu, tta=8, precision="float32")
    assert np.abs(gpu8.foreground - cpu8.foreground).max() <= MAP_TOLERANCE["float32"]


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no Apple MPS on this machine")
def test_predict_and_train_step_on_mps(folder, tmp_path):
    """MPS: float32 prediction (bfloat16 is refused there) and a training step."""
    from napari_instseg.core.predict import predict
    from napari_instseg.core.train import train
    from napari_instseg.core.weights import load_model

    mps = torch.device("mps")
    best = train(_config(folder, tmp_path / "run", mps), progress=False)
    prediction = predict(make_worms((96, 128), seed=2).image, load_model(best), mps, tta=2)
    assert prediction.metadata["precision"] == "float32"
    assert np.isfinite(prediction.foreground).all()
