"""Choosing the torch device."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

_VALID = ("auto", "cuda", "mps", "cpu")

#: What :func:`inference_dtype` accepts.
PRECISIONS = ("auto", "float32", "bfloat16")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, e.g. a cluster job's share).

    ``os.cpu_count()`` counts every core of the machine; a job given 4 of 64 cores that
    started 64 threads would oversubscribe them. Falls back to ``os.cpu_count()`` where the
    affinity cannot be read (macOS, Windows).
    """
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def get_device(preference: str | torch.device | None = "auto") -> torch.device:
    """Return the device to compute on.

    Parameters
    ----------
    preference : str or torch.device or None
        ``"auto"`` (or None) picks CUDA, then Apple MPS, then the CPU. ``"cuda"``, ``"mps"``
        or ``"cpu"`` (optionally with an index, ``"cuda:1"``) ask for one explicitly.

    Returns
    -------
    torch.device
        The device.

    Raises
    ------
    ValueError
        If the name is unknown, or the requested device is not available on this machine.
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    if preference is None or preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = str(preference).split(":")[0]
    if kind not in _VALID or kind == "auto":
        raise ValueError(f"Unknown device {preference!r}; choose one of {', '.join(_VALID)}.")
    try:
        device = torch.device(preference)
    except RuntimeError as err:  # e.g. "cuda:x": torch's own error is a RuntimeError
        raise ValueError(f"Unknown device {preference!r}: {err}") from err
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was requested but no CUDA GPU is available on this machine.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{preference!r} was requested but this machine has {count} CUDA GPU(s) "
                f"(cuda:0 to cuda:{count - 1})."
            )
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("MPS was requested but is not available on this machine.")
    return device


def available_devices() -> list[str]:
    """List the device names usable on this machine, ``"auto"`` first."""
    names = ["auto"]
    if torch.cuda.is_available():
        names.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    names.append("cpu")
    return names


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), for benchmark records."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles).

    On such CPUs bfloat16 autocast runs the network about twice as fast; on others it is
    emulated and slower than float32.
    """
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except (RuntimeError, AttributeError):  # a torch build without the probe
            continue
    return False


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`, else raise ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}."
        )
    return precision


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the network's convolutions run in for inference on ``device``.

    Parameters
    ----------
    device : torch.device
        Where the network runs.
    precision : str
        ``"float32"``, ``"bfloat16"`` (autocast; not on MPS) or ``"auto"``: bfloat16 on
        CUDA GPUs that support it and on CPUs that compute it in hardware
        (:func:`cpu_has_native_bfloat16`), float32 everywhere else.

    Returns
    -------
    torch.dtype
        ``torch.float32`` or ``torch.bfloat16``.

    Raises
    ------
    ValueError
        For an unknown precision, or bfloat16 asked for on MPS.
    """
    if check_precision(precision) == "float32":
        return torch.float32
    if precision == "bfloat16":
        if device.type == "mps":
            raise ValueError("bfloat16 inference is not supported on MPS; use 'float32'.")
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this CUDA GPU does not support bfloat16; use 'float32'.")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bfloat16(device) else torch.float32
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32


def cuda_has_native_bfloat16(device: torch.device | None = None) -> bool:
    """Whether a CUDA GPU computes bfloat16 in hardware (compute capability 8.0 or more).

    ``torch.cuda.is_bf16_supported()`` also says yes for older GPUs (V100, T4), where
    recent torch emulates bfloat16 more slowly than float32, and torch 2.2 then refuses
    bfloat16 autocast altogether. ROCm GPUs count as native.

    Parameters
    ----------
    device : torch.device, optional
        The GPU (default: the current one).

    Returns
    -------
    bool
        False without CUDA.
    """
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return True
    index = None if device is None or device.index is None else device.index
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 8 and torch.cuda.is_bf16_supported()


def training_autocast_dtype(
    device: torch.device, amp: bool = True, cpu_amp: bool = False
) -> torch.dtype | None:
    """The dtype training's forward pass autocasts to on ``device``, or None for float32.

    Parameters
    ----------
    device : torch.device
        Where training runs.
    amp : bool
        bfloat16 autocast on CUDA GPUs that compute it in hardware
        (:func:`cuda_has_native_bfloat16`); older GPUs train in float32, with a warning.
        bfloat16 needs no gradient scaling (float16 would).
    cpu_amp : bool
        bfloat16 autocast on the CPU.

    Returns
    -------
    torch.dtype or None
        ``torch.bfloat16`` or None (no autocast; always None on MPS).
    """
    if device.type == "cuda" and amp:
        if cuda_has_native_bfloat16(device):
            return torch.bfloat16
        warnings.warn(
            "this GPU has no native bfloat16 (compute capability < 8.0): training in "
            "float32 instead of mixed precision",
            stacklevel=2,
        )
        return None
    if device.type == "cpu" and cpu_amp:
        return torch.bfloat16
    return None


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` to ``dtype`` on ``device``, or a null context for float32 / None.

    No autocast object is made when none is needed: torch before 2.5 refuses
    ``torch.autocast("mps", ...)`` even with ``enabled=False``.

    Parameters
    ----------
    device : torch.device
        Where the computation runs.
    dtype : torch.dtype or None
        The lower precision (``torch.bfloat16``), or None / ``torch.float32`` for none.

    Returns
    -------
    contextlib.AbstractContextManager
        The context to run the forward pass in.
    """
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def exact_float32(device: torch.device, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Run CUDA convolutions and matrix products in full float32, not TensorFloat-32.

    PyTorch lets cuDNN use TF32 (a 10-bit mantissa) for float32 convolutions by default,
    which moved the shipped model's maps on an H200 by up to 0.01 against the CPU. A
    prediction asked for in float32 gets float32; the previous settings come back after.
    Elsewhere than CUDA this does nothing.

    Parameters
    ----------
    device : torch.device
        Where the computation runs.
    dtype : torch.dtype or None
        The precision asked for: only None or ``torch.float32`` turn TF32 off (bfloat16
        autocast is left alone).
    """
    if device.type != "cuda" or dtype not in (None, torch.float32):
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def memory_format(device: torch.device) -> torch.memory_format:
    """The memory layout the network's convolutions get on ``device``.

    Channels-last on the CPU (oneDNN runs it ~1.7x faster, training and inference alike)
    and on CUDA (faster under autocast); MPS keeps the default layout, its channels-last
    support being patchy. The values are the same either way.
    """
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format
