"""tensor.parallelize(module, group, plan): tensor parallelism for a model mpipar did not write.

    plan = {"model.embed_tokens": "vocab",
            "model.layers.*.self_attn.q_proj": "colwise", ..., "model.layers.*.self_attn.o_proj": "rowwise"}
    tensor.parallelize(hf_model, mesh.tp, plan)     # in place; returns the module

Each plan key is a fully qualified submodule name in which `*` matches one
name component; each value is a style:
  "colwise"  nn.Linear -> ColumnParallelLinear (output features split; the output stays split)
  "rowwise"  nn.Linear -> RowParallelLinear (input already split; output all-reduced)
  "vocab"    nn.Embedding -> VocabParallelEmbedding (rows split; output all-reduced)
Weights are the module's own (`from_serial`); every other parameter stays
replicated and receives its full gradient on every rank. A plan may carry
`units` (pattern -> a size every shard must be a multiple of, e.g. head_dim),
as mpipar.tensor.plans does, so heads are never cut.

Collective over `group`: every rank checks the whole plan first (a pattern
matching nothing, a module of the wrong type, a size that does not divide,
plans that differ across ranks) and all raise the same MpiparError before
any module is replaced.
"""
from __future__ import annotations

import zlib

from torch import nn

from ..agree import agree, agree_ints
from ..mesh import as_group
from .linear import ColumnParallelLinear, RowParallelLinear
from .vocab import VocabParallelEmbedding

STYLES = {"colwise": nn.Linear, "rowwise": nn.Linear, "vocab": nn.Embedding}


def matches(pattern: str, name: str) -> bool:
    """Whether the dotted `name` matches `pattern` (`*` stands for exactly one component)."""
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(a == "*" or a == b for a, b in zip(p, n))


def _split_size(module: nn.Module, style: str) -> tuple[str, int]:
    if style == "colwise":
        return "out_features", module.out_features
    if style == "rowwise":
        return "in_features", module.in_features
    return "num_embeddings", module.num_embeddings


def plan_error(module: nn.Module, plan: dict, size: int) -> tuple[str | None, list]:
    """(why the plan cannot apply, or None; [(name, style)] to replace). Pure: no communication."""
    if not isinstance(plan, dict) or not plan:
        return "parallelize: plan must be a non-empty dict {pattern: style}", []
    units = getattr(plan, "units", {})
    names = [n for n, _ in module.named_modules() if n]
    todo = []
    for pattern, style in plan.items():
        if style not in STYLES:
            return f"parallelize: {pattern!r}: style must be one of {sorted(STYLES)}, got {style!r}", []
        hits = [n for n in names if matches(pattern, n)]
        if not hits:
            return f"parallelize: plan entry {pattern!r} matches no submodule", []
        for n in hits:
            sub = module.get_submodule(n)
            if not isinstance(sub, STYLES[style]):
                return f"parallelize: {n} is a {type(sub).__name__}, {style!r} needs an {STYLES[style].__name__}", []
            what, length = _split_size(sub, style)
            unit = units.get(pattern, 1)
            if length % (unit * size):
                per = f" ({length // unit} heads of {unit})" if unit > 1 else ""
                return f"parallelize: {n}.{what} = {length}{per} is not divisible by the group size {size}", []
            todo.append((n, style))
    return None, todo


def parallelize(module: nn.Module, group, plan: dict) -> nn.Module:
    """Replace the submodules named by `plan` with their tensor-parallel versions (see module doc)."""
    g = as_group(group)
    key = repr(sorted((str(k), str(v), getattr(plan, "units", {}).get(k, 1)) for k, v in plan.items())) \
        if isinstance(plan, dict) else repr(plan)
    if g.size > 1:
        agree_ints(g.comm, [zlib.crc32(key.encode())],
                   lambda lo, hi: "parallelize: the plan differs across the ranks of the group")
    err, todo = plan_error(module, plan, g.size)
    agree(g.comm, err)
    for name, style in todo:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        old = getattr(parent, leaf)
        if style == "colwise":
            new = ColumnParallelLinear.from_serial(old, g, gather_output=False)
        elif style == "rowwise":
            new = RowParallelLinear.from_serial(old, g, input_is_parallel=True)
        else:
            new = VocabParallelEmbedding.from_serial(old, g)
        setattr(parent, leaf, new)
    return module
