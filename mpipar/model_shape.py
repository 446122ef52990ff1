"""The checks every description of a GPT's shape makes: GPTConfig (mpipar.models.config)
and the planner's ModelSpec (mpipar.plan.spec). Plain Python (no torch, no MPI), so the
planner stays importable without them."""
from __future__ import annotations

from .errors import require

ARCHS = ("gpt2", "llama")
SIZES = ("vocab_size", "seq_len", "hidden", "num_heads", "num_layers")


def positive_int(owner: str, name: str, value) -> None:
    """MpiparError "<owner>: <name> must be a positive int" unless value is an int (not a bool) > 0."""
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{owner}: {name} must be a positive int, got {value!r}")


def check_sizes(owner: str, shape) -> None:
    """The sizes (SIZES) are positive ints and the arch is known."""
    for name in SIZES:
        positive_int(owner, name, getattr(shape, name))
    require(shape.arch in ARCHS, f"{owner}: arch must be one of {ARCHS}, got {shape.arch!r}")


def check_heads(owner: str, shape) -> None:
    """ffn_hidden (once defaulted) is a positive int and the heads split the hidden size."""
    positive_int(owner, "ffn_hidden", shape.ffn_hidden)
    require(shape.hidden % shape.num_heads == 0,
            f"{owner}: hidden {shape.hidden} is not divisible by num_heads {shape.num_heads}")
