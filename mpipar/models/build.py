"""models.GPT: builds the serial model or the parallel one, and is the type of both.

    GPT(cfg)                          -> SerialGPT (mpipar.models.gpt: plain torch, no MPI)
    GPT(cfg, mesh, num_chunks, **kw)  -> ParallelGPT (mpipar.models.parallel), options passed through
    isinstance(model, GPT)            -> True for either

The choice lives here, above both model files, so the serial file imports
nothing parallel and neither file imports the other's side.
"""
from __future__ import annotations

from .gpt import SerialGPT
from .parallel import ParallelGPT


class _GPTType(type):
    def __call__(cls, cfg=None, mesh=None, *args, **kwargs):
        if mesh is None:
            return SerialGPT(cfg, None, *args, **kwargs)
        return ParallelGPT(cfg, mesh, *args, **kwargs)

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, (SerialGPT, ParallelGPT))

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, (SerialGPT, ParallelGPT))


class GPT(metaclass=_GPTType):
    """`GPT(cfg)`: the serial model (SerialGPT); `GPT(cfg, mesh, num_chunks=1, ...)`: the parallel one
    (ParallelGPT, keyword options as its constructor). Both are instances of GPT."""
