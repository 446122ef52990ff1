"""Megatron's column- and row-parallel linear layers.

ColumnParallelLinear: Y = X W^T with W split by OUTPUT features: rank r holds
rows r*out/N .. (r+1)*out/N of the full [out, in] weight and computes its slice
of Y from a copy of X (entry: `copy_to_region`, whose backward all-reduces dX; with
sequence_parallel, an all-gather of the sequence whose backward reduce-scatters
dX, fused with the matmul so that only the local shard of X is saved:
mpipar.tensor.gather_linear).

RowParallelLinear: W split by INPUT features; each rank multiplies its slice of
X and the partial sums are all-reduced (`reduce_from_region`; with
sequence_parallel, `reduce_scatter_to_sequence`). The bias is added once,
after the reduction. With sequence_parallel the bias sees only this rank's
tokens, so its gradient is all-reduced over the group (`copy_to_region`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import comm
from ..errors import require
from . import checks
from .gather_linear import gather_linear
from ..layers.init import generator, linear_params
from .sharding import assemble, shard, take_shard, unshard


class _ParallelLinear(nn.Module):
    """Shared set-up: group, full parameters (seeded or given), forward input check."""

    check_inputs = True  # collective input check in forward (see mpipar.tensor.checks)

    def _setup(self, in_features, out_features, group, bias, seed, full_params):
        super().__init__()
        self.group = checks.group_of(group, self._what)
        require(isinstance(bias, bool), f"{self._what}: bias must be a bool, got {bias!r}")
        self.in_features, self.out_features, self.seed = in_features, out_features, seed
        if full_params is None:
            full_params = linear_params(generator(seed), in_features, out_features, bias)
        w, b = full_params
        require(tuple(w.shape) == (out_features, in_features),
                f"{self._what}: full weight has shape {tuple(w.shape)}, expected {(out_features, in_features)}")
        require((b is not None) == bias, f"{self._what}: bias={bias} but the given bias is {b!r}")
        return w.detach(), (None if b is None else b.detach())

    @classmethod
    def from_serial(cls, linear: nn.Linear, group, **kwargs):
        """Shard an existing nn.Linear (kwargs: the constructor's, e.g. gather_output or
        input_is_parallel; a `seed` is ignored: the weights come from `linear`)."""
        kwargs.pop("seed", None)
        kwargs.setdefault("dtype", linear.weight.dtype)
        kwargs.setdefault("device", linear.weight.device)
        b = None if linear.bias is None else linear.bias.detach()
        return cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                   full_params=(linear.weight.detach(), b), **kwargs)

    def _param(self, t, dtype, device) -> nn.Parameter:
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        return nn.Parameter(t.to(dtype=dtype, device=device).contiguous())

    def _check(self, x, expected, extra=None):
        err = checks.last_dim_error(x, expected, self._what)
        if err is None and extra is not None:
            err = extra(x)
        if self.check_inputs:
            checks.agree_input(self.group, self._what, err, [x])
        else:
            require(err is None, err or "")


class ColumnParallelLinear(_ParallelLinear):
    """Linear layer split by output features. `weight` is this rank's [out/N, in] rows.

    gather_output=True all-gathers the output features (the result is the full
    Y on every rank); otherwise the output is this rank's feature slice.
    sequence_parallel=True: the input is this rank's block of the sequence
    (dim -2) and is all-gathered on entry. `stride` shards a fused weight
    blockwise (see mpipar.tensor.sharding). `full_params=(weight, bias)` shards
    the given full parameters instead of drawing them from `seed`.

    `replicas` > 1 (dividing the group size): the output features are cut into
    size/replicas parts and `replicas` consecutive ranks hold the same part
    (grouped-query K/V heads fewer than the ranks, Megatron's rule); each
    copy's weight gradient is summed over its replicas in the backward, so the
    copies stay equal. `input_in_region=True`: the caller already entered the
    region (one `copy_to_region` / `gather_from_sequence` shared by several
    layers, e.g. q, k and v), so this layer multiplies its input as it is.
    """

    _what = "ColumnParallelLinear"

    def __init__(self, in_features, out_features, group, bias=True, gather_output=False,
                 sequence_parallel=False, seed=0, *, stride=1, dtype=None, device=None, full_params=None,
                 replicas=1, input_in_region=False):
        g = checks.group_of(group, self._what)
        checks.agree_config(g, self._what, [in_features, out_features, bias, gather_output,
                                            sequence_parallel, seed, stride, replicas, input_in_region])
        require(isinstance(stride, int) and stride >= 1, f"{self._what}: stride must be a positive int")
        require(isinstance(replicas, int) and replicas >= 1 and g.size % replicas == 0,
                f"{self._what}: replicas = {replicas!r} must be a positive divisor of the group size {g.size}")
        parts = g.size // replicas
        checks.positive(in_features, self._what, "in_features")
        require(isinstance(out_features, int) and out_features > 0 and out_features % (stride * parts) == 0,
                f"{self._what}: out_features = {out_features} is not divisible by "
                f"{'stride x ' if stride > 1 else ''}the tensor-parallel size {parts}")
        require(not (gather_output and sequence_parallel),
                f"{self._what}: gather_output=True cannot be combined with sequence_parallel=True")
        require(not (gather_output and replicas > 1), f"{self._what}: gather_output=True needs replicas=1")
        require(not (input_in_region and sequence_parallel),
                f"{self._what}: input_in_region=True takes the full sequence (sequence_parallel=False)")
        self.input_in_region = bool(input_in_region)
        w, b = self._setup(in_features, out_features, group, bias, seed, full_params)
        self.gather_output, self.sequence_parallel, self.stride = gather_output, sequence_parallel, stride
        self.replicas, self.part, self.parts = replicas, g.rank // replicas, parts
        self.out_local = out_features // parts
        self.weight = self._param(take_shard(w, self.part, parts, 0, stride), dtype, device)
        self.bias = None if b is None else self._param(take_shard(b, self.part, parts, 0, stride), dtype, device)
        self.replica_group = None
        if replicas > 1:
            self.replica_group = g.split(self.part, g.rank, "tp-replicas")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.in_features)
        return self.forward_unchecked(x)

    def forward_unchecked(self, x: torch.Tensor) -> torch.Tensor:
        """forward without the input check (for blocks that checked their input already)."""
        weight, bias = self.weight, self.bias
        if self.replica_group is not None:  # identity forward; backward sums the copies' gradients
            weight = comm.copy_to_region(weight, self.replica_group)
            bias = None if bias is None else comm.copy_to_region(bias, self.replica_group)
        if self.input_in_region:
            y = F.linear(x, weight, bias)
        elif self.sequence_parallel:  # all-gather fused in: keeps only the local shard for backward
            y = gather_linear(x, weight, bias, self.group)
        else:
            y = F.linear(comm.copy_to_region(x, self.group), weight, bias)
        if self.gather_output:
            y = comm.gather_from_region(y, self.group, dim=-1)
        return y

    def full_state_dict(self) -> dict:
        """The serial nn.Linear's state_dict, on every rank (collective)."""
        out = {"weight": self._unshard(self.weight)}
        if self.bias is not None:
            out["bias"] = self._unshard(self.bias)
        return out

    def _unshard(self, local: torch.Tensor) -> torch.Tensor:
        if self.replicas == 1:
            return unshard(local, self.group, 0, self.stride)
        pieces = comm.all_gather(local.detach().contiguous(), self.group, dim=0).chunk(self.group.size)
        return assemble(list(pieces[::self.replicas]), 0, self.stride)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (local {self.out_local}), "
                f"replicas={self.replicas}, "
                f"tp={self.group.size}, bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_ParallelLinear):
    """Linear layer split by input features. `weight` is this rank's [out, in/N] columns.

    input_is_parallel=True: the input is this rank's feature slice (e.g. the
    output of a ColumnParallelLinear); False: the full input, split on entry.
    The output is full-feature, all-reduced; with sequence_parallel=True it is
    reduce-scattered along the sequence (dim -2) instead, which must divide.
    """

    _what = "RowParallelLinear"

    def __init__(self, in_features, out_features, group, bias=True, input_is_parallel=True,
                 sequence_parallel=False, seed=0, *, dtype=None, device=None, full_params=None):
        g = checks.group_of(group, self._what)
        checks.agree_config(g, self._what, [in_features, out_features, bias, input_is_parallel,
                                            sequence_parallel, seed])
        in_local = checks.divisible(in_features, g, self._what, "in_features")
        checks.positive(out_features, self._what, "out_features")
        require(input_is_parallel or not sequence_parallel,
                f"{self._what}: sequence_parallel=True needs input_is_parallel=True")
        w, b = self._setup(in_features, out_features, group, bias, seed, full_params)
        self.in_local = in_local
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = self._param(shard(w, g, 1), dtype, device)
        self.bias = None if b is None else self._param(b.clone(), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.in_local if self.input_is_parallel else self.in_features
        extra = (lambda t: checks.seq_error(t, self.group, self._what)) if self.sequence_parallel else None
        self._check(x, expected, extra)
        return self.forward_unchecked(x)

    def forward_unchecked(self, x: torch.Tensor) -> torch.Tensor:
        """forward without the input check (for blocks that checked their input already)."""
        if not self.input_is_parallel:
            x = comm.scatter_to_region(x, self.group, dim=-1)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence(y, self.group, dim=-2)
            bias = None if self.bias is None else comm.copy_to_region(self.bias, self.group)
        else:
            y = comm.reduce_from_region(y, self.group)
            bias = self.bias
        return y if bias is None else y + bias

    def full_state_dict(self) -> dict:
        """The serial nn.Linear's state_dict, on every rank (collective)."""
        out = {"weight": unshard(self.weight, self.group, 1)}
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.in_local}), out_features={self.out_features}, "
                f"tp={self.group.size}, bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")
