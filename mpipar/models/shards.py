"""Which slice of which serial tensor every local parameter holds (pure torch, no MPI).

A `ParamSpec` ties a local parameter to its serial name and to how the full
tensor is cut over the tensor-parallel group: `dim=None` (a full replica), or
split along `dim` into `tp_size` parts, where with `stride` > 1 the dimension
is first viewed as `stride` equal blocks (fused [q | k | v]) and each block is
split separately (mpipar.tensor.sharding's convention). Checkpoints, the
global gradient norm and `full_state_dict` all work from these specs, so they
never depend on the layout.

`primary=False` marks a second copy of a parameter that lives elsewhere too
(the tied head's copy of tok_emb.weight on the last pipeline stage).
`replicas` > 1: that many consecutive tensor-parallel ranks hold the same
part (K/V heads fewer than the ranks); `part` is then tp_rank // replicas.
`sp_reduce=True` marks a replicated parameter that only sees this rank's slice
of the sequence under Megatron sequence parallelism (LayerNorms, the position
embedding): its gradient must be summed over the tensor-parallel group.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from ..tensor.sharding import assemble, take_shard  # noqa: F401  (re-exported: checkpoints use them)


@dataclasses.dataclass
class ParamSpec:
    param: nn.Parameter
    name: str                 # serial name, e.g. "blocks.3.attn.qkv.weight"
    dim: int | None = None    # split dimension, None: replicated
    stride: int = 1
    part: int = 0             # this rank's part (tensor-parallel rank)
    parts: int = 1            # number of parts (tensor-parallel size)
    primary: bool = True
    sp_reduce: bool = False
    replicas: int = 1         # consecutive tp ranks holding the same part (grouped K/V heads)

    @property
    def sharded(self) -> bool:
        return self.dim is not None and self.parts > 1

    def full_shape(self) -> list[int]:
        shape = list(self.param.shape)
        if self.dim is not None:
            shape[self.dim] *= self.parts
        return shape


def serial_specs(model: nn.Module) -> list[ParamSpec]:
    """Every parameter of a serial model: a full replica under its own name."""
    return [ParamSpec(p, name) for name, p in model.named_parameters()]


def parallel_specs(model: nn.Module, tp_rank: int, tp_size: int, sequence_parallel: bool,
                   aliases: dict | None = None) -> list[ParamSpec]:
    """Specs of a parallel model whose parameter names are the serial names.

    The split follows the owning module's type: ColumnParallelLinear (dim 0,
    its stride), RowParallelLinear weight (dim 1; its bias is replicated and
    reduced by the layer itself), VocabParallelEmbedding and modules with a
    `vocab_parallel = True` attribute (dim 0). `aliases` maps a local name to
    (serial name, primary) for copies such as the tied head.
    """
    from ..tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    aliases = aliases or {}
    specs = []
    for name, p in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        dim, stride, reduce, part, parts, replicas = None, 1, False, tp_rank, tp_size, 1
        if isinstance(owner, ColumnParallelLinear):
            dim, stride, part, parts, replicas = 0, owner.stride, owner.part, owner.parts, owner.replicas
        elif isinstance(owner, RowParallelLinear):
            dim = 1 if leaf == "weight" else None
        elif isinstance(owner, VocabParallelEmbedding) or getattr(owner, "vocab_parallel", False):
            dim = 0
        else:
            reduce = sequence_parallel and tp_size > 1
        serial_name, primary = aliases.get(name, (name, True))
        if dim is None or parts == 1:
            part, parts = 0, 1
        specs.append(ParamSpec(p, serial_name, dim, stride, part, parts, primary, reduce, replicas))
    return specs
