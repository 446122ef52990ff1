"""mpipar.sequence: sequence parallelism (Ring Attention, Ulysses) and sequence layouts.

    ring_attention(q, k, v, group, causal=True, layout="zigzag") -> out
    ulysses_attention(q, k, v, group, causal=True, layout="zigzag") -> out
    shard_sequence(x, group, dim=2, layout="zigzag")   # this rank's part
    gather_sequence(x, group, dim=2, layout="zigzag")  # the full tensor back

q, k, v, out: [batch, heads, local_seq, head_dim], this rank's part of the
sequence ("contiguous": block r of N; "zigzag": blocks r and 2N-1-r of 2N).
"""
from .tiles import attended_pairs
from .layout import LAYOUTS, gather_sequence, local_positions, shard_sequence
from .ring_attention import ring_attention
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "shard_sequence", "gather_sequence",
           "attended_pairs", "local_positions", "LAYOUTS"]
