"""Device choice, precision and autocast rules, checked on the CPU with a faked GPU.

No GPU is needed: ``torch.cuda`` queries are monkeypatched to stand for GPUs of given
compute capabilities, and ``torch.autocast`` is replaced by one that refuses MPS as torch
2.2 to 2.4 do. The runs on a real GPU are in ``tests/test_cuda.py``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from napari_instseg.core.device import (
    autocast,
    cuda_has_native_bfloat16,
    get_device,
    inference_dtype,
    training_autocast_dtype,
)

NO_CUDA = not torch.cuda.is_available()


def _fake_gpu(monkeypatch, capability: tuple[int, int], bf16: bool = True, count: int = 1):
    """Make ``torch.cuda`` describe ``count`` GPUs of one compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.version, "hip", None)


def test_get_device_takes_names_and_device_objects():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device(torch.device("cpu")) == torch.device("cpu")
    assert get_device("cpu:0") == torch.device("cpu:0")
    assert get_device(None).type in ("cuda", "mps", "cpu")
    assert get_device("auto") == get_device(None)


@pytest.mark.parametrize("name", ["gpu", "CUDA", "auto:0", "cuda:x", "cpu:-1x", ""])
def test_get_device_unknown_names_are_value_errors(name):
    with pytest.raises(ValueError, match="Unknown device"):
        get_device(name)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_get_device_cuda_without_a_gpu_says_so():
    for name in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match="no CUDA GPU"):
            get_device(name)


def test_get_device_cuda_index_beyond_the_gpus(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0), count=2)
    assert get_device("cuda:1") == torch.device("cuda:1")
    assert get_device(torch.device("cuda", 0)) == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"has 2 CUDA GPU\(s\)"):
        get_device("cuda:2")


def test_get_device_mps_when_absent(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="MPS was requested"):
        get_device("mps")


def test_native_bfloat16_needs_compute_capability_8(monkeypatch):
    _fake_gpu(monkeypatch, (7, 0), bf16=True)  # a V100: torch emulates bfloat16
    assert cuda_has_native_bfloat16() is False
    assert inference_dtype(torch.device("cuda")) is torch.float32
    _fake_gpu(monkeypatch, (9, 0))  # an H100 / H200
    assert cuda_has_native_bfloat16(torch.device("cuda:0")) is True
    assert inference_dtype(torch.device("cuda")) is torch.bfloat16
    assert inference_dtype(torch.device("cuda"), "float32") is torch.float32


def test_no_cuda_means_no_native_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_has_native_bfloat16() is False


def test_explicit_bfloat16_on_a_gpu_without_it_is_a_value_error(monkeypatch):
    _fake_gpu(monkeypatch, (6, 1), bf16=False)  # torch 2.2 on a Pascal GPU
    with pytest.raises(ValueError, match="does not support bfloat16"):
        inference_dtype(torch.device("cuda"), "bfloat16")


def test_training_autocast_dtype(monkeypatch):
    cpu, mps, cuda = torch.device("cpu"), torch.device("mps"), torch.device("cuda")
    assert training_autocast_dtype(cpu) is None
    assert training_autocast_dtype(cpu, cpu_amp=True) is torch.bfloat16
    assert training_autocast_dtype(mps, amp=True, cpu_amp=True) is None
    _fake_gpu(monkeypatch, (9, 0))
    assert training_autocast_dtype(cuda) is torch.bfloat16
    assert training_autocast_dtype(cuda, amp=False) is None
    assert training_autocast_dtype(cuda, amp=False, cpu_amp=True) is None
    # older GPUs: float32 with a warning rather than torch 2.2's RuntimeError (or slow
    # emulated bfloat16 on later torch)
    _fake_gpu(monkeypatch, (7, 5), bf16=False)
    with pytest.warns(UserWarning, match="float32"):
        assert training_autocast_dtype(cuda) is None


class _OldTorchAutocast:
    """``torch.autocast`` as torch 2.2 to 2.4 have it: MPS is refused even when disabled."""

    made: list[str] = []

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        _OldTorchAutocast.made.append(device_type)
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"User specified an unsupported autocast device_type '{device_type}'"
            )
        self.inner = _REAL_AUTOCAST(device_type, dtype=dtype, enabled=enabled)

    def __enter__(self):
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


_REAL_AUTOCAST = torch.autocast


@pytest.fixture()
def old_autocast(monkeypatch):
    _OldTorchAutocast.made = []
    monkeypatch.setattr(torch, "autocast", _OldTorchAutocast)
    return _OldTorchAutocast


def test_autocast_makes_no_autocast_object_when_none_is_needed(old_autocast):
    for dtype in (None, torch.float32):
        context = autocast(torch.device("mps"), dtype)
        assert isinstance(context, contextlib.nullcontext)
        with context:
            pass
    assert old_autocast.made == []
    conv = torch.nn.Conv2d(1, 2, 3)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert conv(torch.zeros(1, 1, 8, 8)).dtype is torch.bfloat16
    assert old_autocast.made == ["cpu"]


def test_float32_prediction_and_training_make_no_autocast(old_autocast, tmp_path):
    """On MPS with torch < 2.5 any ``torch.autocast("mps", ...)`` raised: predict and train
    entered one even for float32, so both crashed on a Mac. Checked here on the CPU."""
    from napari_instseg.core.model import InstSegNet, ModelConfig
    from napari_instseg.core.predict import predict
    from napari_instseg.core.synthetic import make_worms
    from napari_instseg.core.train import TrainConfig, train
    from napari_instseg.core.training_folder import write_training_folder

    torch.manual_seed(0)
    model = InstSegNet(ModelConfig(channels=(8, 16), embedding_dim=4, head_channels=8))
    image = np.random.default_rng(0).normal(100, 10, (40, 56)).astype(np.float32)
    prediction = predict(image, model, "cpu", tta=2, precision="float32")
    assert prediction.metadata["precision"] == "float32"
    sample = make_worms((64, 64), n_worms=3, length=(20, 30), seed=0)
    sample.name = "w"
    folder = write_training_folder(tmp_path / "data", [sample])
    config = TrainConfig(
        data=[str(folder)],
        train_wells="",
        val_wells="",
        out=str(tmp_path / "run"),
        model={"channels": [8, 16], "embedding_dim": 4, "head_channels": 8},
        epochs=1,
        steps_per_epoch=1,
        batch_size=1,
        crop_size=32,
        device="cpu",
    )
    assert train(config, progress=False).is_file()
    assert old_autocast.made == []


def test_train_config_keeps_a_torch_device_as_text(tmp_path):
    from napari_instseg.core.train import TrainConfig

    config = TrainConfig(device=torch.device("cpu"))
    assert config.device == "cpu"
    config.to_toml(tmp_path / "c.toml")  # tomli_w cannot write a torch.device
    assert TrainConfig.from_toml(tmp_path / "c.toml").device == "cpu"


def test_memory_format_per_device():
    """Channels-last on CPU and CUDA; MPS keeps the default layout in training and prediction."""
    from napari_instseg.core.device import memory_format

    assert memory_format(torch.device("cpu")) is torch.channels_last
    assert memory_format(torch.device("cuda")) is torch.channels_last
    assert memory_format(torch.device("mps")) is torch.contiguous_format


def test_prediction_uses_the_devices_memory_format(monkeypatch):
    import napari_instseg.core.predict as predict_module
    from napari_instseg.core.model import InstSegNet, ModelConfig

    model = InstSegNet(ModelConfig(channels=(8, 16), embedding_dim=4, head_channels=8)).eval()
    seen = []
    real = predict_module._network_maps

    def spy(net, x, origin, tta, layout=torch.channels_last):
        seen.append(layout)
        return (yield from real(net, x, origin, tta, layout))

    monkeypatch.setattr(predict_module, "_network_maps", spy)
    monkeypatch.setattr(predict_module, "memory_format", lambda dev: torch.contiguous_format)
    steps = predict_module.iter_predict_normalized(
        np.zeros((1, 32, 48), np.float32), model, torch.device("cpu"), tta=2, precision="float32"
    )
    for _ in steps:
        pass
    assert seen == [torch.contiguous_format]


@pytest.fixture
def tf32_on():
    """TF32 allowed for cuDNN and matrix products (PyTorch's cuDNN default); restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.mark.usefixtures("tf32_on")
def test_exact_float32_turns_tf32_off_on_cuda_and_restores_it():
    from napari_instseg.core.device import exact_float32

    cuda = torch.device("cuda")
    for dtype in (None, torch.float32):
        with exact_float32(cuda, dtype):
            assert _tf32_flags() == (False, False)
        assert _tf32_flags() == (True, True)
    with pytest.raises(RuntimeError), exact_float32(cuda):
        raise RuntimeError("a failed pass")
    assert _tf32_flags() == (True, True)


@pytest.mark.usefixtures("tf32_on")
def test_exact_float32_leaves_bfloat16_and_other_devices_alone():
    from napari_instseg.core.device import exact_float32

    with exact_float32(torch.device("cuda"), torch.bfloat16):
        assert _tf32_flags() == (True, True)
    for name in ("cpu", "mps"):
        with exact_float32(torch.device(name), torch.float32):
            assert _tf32_flags() == (True, True)


@pytest.mark.parametrize(("precision", "dtype"), [("float32", torch.float32), ("auto", None)])
def test_prediction_runs_each_pass_in_the_asked_precision(monkeypatch, precision, dtype):
    """Every network pass runs inside exact_float32 with the prediction's dtype, so that a
    float32 prediction on CUDA is float32 and not TF32 (0.01 off the CPU's maps on an H200)."""
    import napari_instseg.core.predict as predict_module
    from napari_instseg.core.model import InstSegNet, ModelConfig

    model = InstSegNet(ModelConfig(channels=(8, 16), embedding_dim=4, head_channels=8)).eval()
    entered = []

    @contextlib.contextmanager
    def spy(device, asked):
        entered.append((device.type, asked))
        yield

    monkeypatch.setattr(predict_module, "exact_float32", spy)
    steps = predict_module.iter_predict_normalized(
        np.zeros((1, 32, 48), np.float32), model, torch.device("cpu"), tta=2, precision=precision
    )
    for _ in steps:
        pass
    expected = predict_module.inference_dtype(torch.device("cpu"), precision)
    assert entered and all(e == ("cpu", expected) for e in entered)
    if dtype is not None:
        assert expected == dtype
