"""mpipar: tensor, pipeline and sequence parallelism for PyTorch over MPI.

Public names: Mesh, Group, MpiparError and the subpackages comm, tensor,
pipeline, sequence, models, trace, analysis, flight, plan (imported lazily: `mpipar.tensor` etc.).
"""
from __future__ import annotations

import importlib

from . import settings  # noqa: F401  (first: it sets torch's huge-page default before torch is imported)
from .errors import MpiparError

__version__ = "0.1.0"
_SUBPACKAGES = ("comm", "tensor", "pipeline", "sequence", "models", "trace", "analysis", "flight", "plan")

__all__ = ["Mesh", "Group", "MpiparError", "__version__", *_SUBPACKAGES]


def __getattr__(name):
    if name in ("Mesh", "Group"):  # lazily: mesh imports torch, and mpipar.plan must import without it
        from . import mesh
        return getattr(mesh, name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'mpipar' has no attribute {name!r}")
