"""mpipar.comm: collectives, point-to-point and autograd region operators on torch tensors."""
from .autograd import (copy_to_region, gather_from_region, gather_from_sequence, reduce_from_region,
                       reduce_scatter_to_sequence, scatter_to_region)
from .collectives import all_gather, all_reduce, all_to_all, broadcast, reduce_scatter
from .cost import bus_factor, cost, fit_alpha_beta
from .p2p import Request, irecv, isend, recv, send
from .symmetric.pool import free_symmetric, is_symmetric, symmetric_empty
from .wait import wait, wait_all

__all__ = [
    "all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all",
    "send", "recv", "isend", "irecv", "Request", "wait", "wait_all",
    "copy_to_region", "reduce_from_region", "scatter_to_region", "gather_from_region",
    "reduce_scatter_to_sequence", "gather_from_sequence",
    "cost", "bus_factor", "fit_alpha_beta",
    "symmetric_empty", "is_symmetric", "free_symmetric",
]
