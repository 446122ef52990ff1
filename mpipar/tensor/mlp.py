"""ParallelMLP: Megatron's tensor-parallel feed-forward block.

fc1 is column-parallel (each rank computes ffn/N features of GELU(x W1^T)),
fc2 is row-parallel (partial sums), so the whole block communicates ONCE in
the forward (one all-reduce; with sequence_parallel one all-gather before fc1
and one reduce-scatter after fc2) and once in the backward (the all-reduce of
dX). With sequence_parallel the backward has a reduce-scatter (dX), two
all-gathers (dY of fc2, and fc1's input again: only its local shard is kept)
and the tiny all-reduce of fc2's bias gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import require
from . import checks
from ..layers.init import generator, linear_params
from .linear import ColumnParallelLinear, RowParallelLinear


class ParallelMLP(nn.Module):
    """fc1: ColumnParallelLinear(hidden, ffn), GELU, fc2: RowParallelLinear(ffn, hidden).

    GELU is exact, or the tanh approximation with `approximate="tanh"` (GPT-2's).

    Input and output: [..., seq, hidden], replicated on the group; with
    sequence_parallel=True, this rank's block of the sequence (dim -2).
    `full_params=((w1, b1), (w2, b2))` shards given full parameters instead of
    drawing them from `seed` (fc1 drawn first, then fc2, from one generator).
    """

    _what = "ParallelMLP"
    check_inputs = True

    def __init__(self, hidden, ffn_hidden, group, sequence_parallel=False, seed=0, *,
                 dtype=None, device=None, full_params=None, approximate="none"):
        super().__init__()
        self.group = checks.group_of(group, self._what)
        checks.agree_config(self.group, self._what, [hidden, ffn_hidden, sequence_parallel, seed, approximate])
        require(approximate in ("none", "tanh"), f"{self._what}: approximate must be 'none' or 'tanh'")
        self.approximate = approximate
        checks.positive(hidden, self._what, "hidden")
        checks.divisible(ffn_hidden, self.group, self._what, "ffn_hidden")
        require(isinstance(sequence_parallel, bool), f"{self._what}: sequence_parallel must be a bool")
        if full_params is None:
            gen = generator(seed)
            full_params = (linear_params(gen, hidden, ffn_hidden), linear_params(gen, ffn_hidden, hidden))
        p1, p2 = full_params
        self.hidden, self.ffn_hidden, self.sequence_parallel = hidden, ffn_hidden, sequence_parallel
        kw = dict(sequence_parallel=sequence_parallel, seed=seed, dtype=dtype, device=device)
        self.fc1 = ColumnParallelLinear(hidden, ffn_hidden, self.group, full_params=p1, **kw)
        self.fc2 = RowParallelLinear(ffn_hidden, hidden, self.group, full_params=p2, **kw)
        self.fc1.check_inputs = self.fc2.check_inputs = False  # checked here once; local checks only

    @classmethod
    def from_serial(cls, mlp: nn.Module, group, **kwargs) -> "ParallelMLP":
        """Shard a serial models.MLP (anything with fc1/fc2 nn.Linear)."""
        kwargs.pop("seed", None)
        kwargs.setdefault("dtype", mlp.fc1.weight.dtype)
        kwargs.setdefault("device", mlp.fc1.weight.device)
        kwargs.setdefault("approximate", getattr(getattr(mlp, "act", None), "approximate", "none"))
        params = tuple((lin.weight.detach(), lin.bias.detach()) for lin in (mlp.fc1, mlp.fc2))
        return cls(mlp.fc1.in_features, mlp.fc1.out_features, group, full_params=params, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        err = checks.last_dim_error(x, self.hidden, self._what)
        if self.check_inputs:
            checks.agree_input(self.group, self._what, err, [x])
        else:
            require(err is None, err or "")
        # called as modules (not forward_unchecked): their forward hooks fire, which the pipeline's
        # input/weight-gradient split relies on (mpipar.pipeline.weight_grad)
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))

    def full_state_dict(self) -> dict:
        """models.MLP's state_dict (fc1.weight, fc1.bias, fc2.weight, fc2.bias) on every rank."""
        out = {}
        for name in ("fc1", "fc2"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).full_state_dict().items()})
        return out

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, tp={self.group.size}, "
                f"sequence_parallel={self.sequence_parallel}")
