"""Choosing the torch device a run uses."""

from __future__ import annotations

import torch

from cps4_engine.errors import CPS4Error
from cps4_engine.options import DEVICES

DEVICE_CHOICES = DEVICES


def available_devices() -> list[str]:
    """Names of the devices this machine can run on, best first."""
    names = []
    if torch.cuda.is_available():
        names.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|mps`` (or ``cuda:N``) into a usable ``torch.device``.

    Raises:
        CPS4Error: the device is unknown or not present on this machine.
    """
    if name == "auto":
        return torch.device(available_devices()[0])
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise CPS4Error(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if kind not in available_devices():
        raise CPS4Error(
            f"device {name!r} is not available on this machine "
            f"(available: {', '.join(available_devices())})"
        )
    return torch.device(name)
