"""ParallelSwiGLU: Llama's feed-forward block under tensor parallelism (Megatron's split).

gate and up are column-parallel (each rank computes ffn/N features of
silu(x Wg^T) * (x Wu^T)), down is row-parallel (partial sums). The input
enters the tensor-parallel region ONCE for gate and up together, so the block
communicates once in the forward (the all-reduce after down; with
sequence_parallel an all-gather before and a reduce-scatter after) and once in
the backward (the all-reduce of dX; with sequence_parallel a reduce-scatter).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..errors import require
from . import checks
from .linear import ColumnParallelLinear, RowParallelLinear


class ParallelSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate, up column- and down row-parallel; no biases.

    Input and output [..., seq, hidden], replicated on the group; with
    sequence_parallel=True this rank's block of the sequence (dim -2).
    `full_params=(w_gate, w_up, w_down)`: the serial weights.
    """

    _what = "ParallelSwiGLU"
    check_inputs = True

    def __init__(self, hidden, ffn_hidden, group, full_params, sequence_parallel=False, *, dtype=None, device=None):
        super().__init__()
        self.group = g = checks.group_of(group, self._what)
        checks.agree_config(g, self._what, [hidden, ffn_hidden, sequence_parallel])
        checks.positive(hidden, self._what, "hidden")
        checks.divisible(ffn_hidden, g, self._what, "ffn_hidden")
        require(isinstance(sequence_parallel, bool), f"{self._what}: sequence_parallel must be a bool")
        self.hidden, self.ffn_hidden, self.sequence_parallel = hidden, ffn_hidden, sequence_parallel
        w_gate, w_up, w_down = full_params
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate = ColumnParallelLinear(hidden, ffn_hidden, g, full_params=(w_gate, None), input_in_region=True, **kw)
        self.up = ColumnParallelLinear(hidden, ffn_hidden, g, full_params=(w_up, None), input_in_region=True, **kw)
        self.down = RowParallelLinear(ffn_hidden, hidden, g, full_params=(w_down, None),
                                      sequence_parallel=sequence_parallel, **kw)
        for m in (self.gate, self.up, self.down):
            m.check_inputs = False  # checked here once

    @classmethod
    def from_serial(cls, mlp: nn.Module, group, **kwargs) -> "ParallelSwiGLU":
        """Shard a serial models.SwiGLU (gate, up, down nn.Linear without bias)."""
        kwargs.setdefault("dtype", mlp.gate.weight.dtype)
        kwargs.setdefault("device", mlp.gate.weight.device)
        params = tuple(lin.weight.detach() for lin in (mlp.gate, mlp.up, mlp.down))
        return cls(mlp.gate.in_features, mlp.gate.out_features, group, params, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        err = checks.last_dim_error(x, self.hidden, self._what)
        if err is None and self.sequence_parallel:
            err = None if x.dim() >= 2 else f"{self._what}: sequence_parallel needs a sequence dim"
        if self.check_inputs:
            checks.agree_input(self.group, self._what, err, [x])
        else:
            require(err is None, err or "")
        x = comm.gather_from_sequence(x, self.group, dim=-2) if self.sequence_parallel \
            else comm.copy_to_region(x, self.group)
        return self.down(F.silu(self.gate(x)) * self.up(x))

    def full_state_dict(self) -> dict:
        """models.SwiGLU's state_dict on every rank (collective over the group)."""
        return {f"{n}.weight": getattr(self, n).full_state_dict()["weight"] for n in ("gate", "up", "down")}

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, tp={self.group.size}, "
                f"sequence_parallel={self.sequence_parallel}")
