"""mpipar.tensor: Megatron-style tensor parallelism (with Megatron sequence parallelism).

Every layer takes the tensor-parallel Group it works on (e.g. `mesh.tp`), draws
its FULL parameters from `seed` and keeps this rank's shard (the numbers never
depend on the layout), and offers `from_serial(module, group, ...)` and
`full_state_dict()`. Constructors are collective over the group (they check
that every rank passed the same arguments). `parallelize(module, group, plan)`
applies them to a model mpipar did not write (`plans.llama` for transformers' Llama).
"""
from .attention import ParallelSelfAttention
from ..layers.init import seeded_embedding, seeded_init_, seeded_linear
from .linear import ColumnParallelLinear, RowParallelLinear
from .mlp import ParallelMLP
from .sharding import shard, unshard
from .vocab import VocabParallelEmbedding, vocab_parallel_cross_entropy
from .gqa import ParallelGQAttention
from .swiglu import ParallelSwiGLU
from .parallelize import parallelize
from . import plans

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "ParallelMLP", "ParallelSelfAttention",
    "seeded_init_", "seeded_linear", "seeded_embedding", "shard", "unshard",
    "ParallelGQAttention", "ParallelSwiGLU", "parallelize", "plans",
]
