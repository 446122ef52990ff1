"""This host's own calibration: the System named "local".

A calibration describes one kind of machine: the shipped `local-cpu` was
measured on another host, and on a host with other cores (AVX2 against
AVX-512, a different clock) its rates are wrong several-fold, so its
predictions would be too. `python -m mpipar.plan calibrate` therefore also
stores what it measured as this host's calibration, under
~/.cache/mpipar/plan/, keyed by what decides the rates (CPU model and vector
unit, cores this process may use, torch version); `System.load("local")`
finds it on any later run on the same kind of host, like an autotuner's cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "mpipar" / "plan"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint() -> dict:
    """What makes two hosts' calibrations interchangeable."""
    try:
        import torch

        capability, version = torch.backends.cpu.get_cpu_capability(), torch.__version__
    except Exception:  # noqa: BLE001 - no torch: still a key, just a coarser one
        capability, version = "", ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"machine": platform.machine(), "cpu": _cpu_model(), "vector": capability, "cores": cores,
            "torch": version}


def key(fp: dict | None = None) -> str:
    fp = fingerprint() if fp is None else fp
    return hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(fp: dict | None = None) -> Path:
    """Where this host's calibration is (or would be) kept."""
    return CACHE_DIR / f"local-{key(fp)}.json"


def matches(data: dict) -> bool:
    """Whether a system's JSON was calibrated on a host like this one."""
    return data.get("host") == fingerprint()
