"""Choosing the torch device."""

from __future__ import annotations

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
    if kind not in _VALID:
        raise ValueError(f"Unknown device {preference!r}; choose one of {', '.join(_VALID)}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA GPU is available on this machine.")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("MPS was requested but is not available on this machine.")
    return torch.device(preference)


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
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32
