"""Node shared memory: symmetric tensors and the collectives that read peers' memory directly.

window (one MPI-3 shared window) -> pool (symmetric tensors, reuse) -> barrier and
entry (how a collective starts and ends) -> collectives (all-reduce, all-gather,
reduce-scatter, broadcast on pooled tensors; kernels and the compiled C kernel),
hierarchical (several nodes), activations (layer outputs born in shared memory).
"""
from .pool import free_symmetric, is_symmetric, pool_of, symmetric_empty

__all__ = ["symmetric_empty", "is_symmetric", "free_symmetric", "pool_of"]
