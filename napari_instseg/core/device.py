"""Choosing the torch device."""

from __future__ import annotations

import torch

_VALID = ("auto", "cuda", "mps", "cpu")


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
