"""mpipar.plan: predict and explain the step time and memory of any layout (pure Python, no MPI, no torch).

    from mpipar import plan
    spec = plan.ModelSpec(vocab_size, seq_len, hidden, num_heads, num_layers)
    system = plan.System.load("a100-80gb")
    est = plan.estimate(spec, system, plan.Layout(tp=2, pp=2, dp=2, global_batch=64))
    ranked = plan.search(spec, system, world_size=64, global_batch=512)

See docs/plan.md for the model, its sources and its measured error.
"""
from .estimate import COMPONENTS, Estimate, estimate, model_flops_per_token
from .search import search
from .spec import Layout, ModelSpec
from .system import System

__all__ = ["ModelSpec", "Layout", "System", "Estimate", "estimate", "search", "COMPONENTS",
           "model_flops_per_token"]
