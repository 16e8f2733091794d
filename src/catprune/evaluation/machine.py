"""Where numbers are measured: one environment report and one CUDA synchronisation helper.

`environment` is the single description of the machine and the software versions behind a measurement (the
evaluation writes it into ``settings.json``; other tools can call it too). `cuda_sync` waits for queued CUDA work
so that a wall-clock interval covers it; it does nothing on other devices.

Example:
    >>> env = environment("cpu")
    >>> env["device"], isinstance(env["cpu_count"], int), "torch" in env
    ('cpu', True, True)
    >>> cuda_sync("cpu")  # a no-op off CUDA
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

import torch

#: Packages whose versions the environment report lists (None when not installed).
REPORTED_PACKAGES = ("catprune", "diffusers", "transformers", "accelerate", "cache-dit")


def cuda_sync(device: str | torch.device | None = None) -> None:
    """Wait for all queued work on a CUDA ``device`` (None: the current CUDA device, if CUDA is available).

    Does nothing for CPU or other devices, or when CUDA is not available, so it can bracket any timed region.

    Example:
        >>> cuda_sync(torch.device("cpu"))
    """
    if device is not None and torch.device(device).type != "cuda":
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize(None if device is None else torch.device(device))


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def environment(device: str | torch.device | None = None, driver: bool = False) -> dict:
    """The machine and software behind a measurement, as a JSON-ready dict.

    Keys: ``device`` (as given, or None), ``cpu`` (model name), ``cpu_count``, ``torch_threads``, ``python``,
    ``platform``, ``torch``, ``cuda`` (torch's CUDA version or None), ``cuda_available``, ``gpus`` (names of all
    visible CUDA devices), ``gpu`` (name of ``device`` when it is a CUDA device), ``driver`` (NVIDIA driver, only
    with ``driver=True`` since it runs ``nvidia-smi``) and one key per package of `REPORTED_PACKAGES` (its version,
    or None when not installed).

    Args:
        device: the device the measurement ran on (e.g. ``"cuda:0"``); None when not about one device.
        driver: also ask ``nvidia-smi`` for the driver version (None when it is unavailable).

    Example:
        >>> env = environment()
        >>> env["device"] is None and env["python"].count(".") == 2
        True
    """
    cuda = torch.cuda.is_available()
    info = {
        "device": None if device is None else str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }
    info.update({package: _version(package) for package in REPORTED_PACKAGES})
    if device is not None and torch.device(device).type == "cuda" and cuda:
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if driver:
        info["driver"] = _driver() if cuda else None
    return info


__all__ = ["REPORTED_PACKAGES", "cuda_sync", "environment"]
