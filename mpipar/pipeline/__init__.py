"""mpipar.pipeline: pipeline schedules as data, a validator, a simulator and an MPI runner."""
from .partition import partition
from .schedules import SCHEDULES, Action, all_stages, schedule
from .simulate import SimResult, simulate, simulate_actions
from .validate import validate

__all__ = ["schedule", "SCHEDULES", "Action", "all_stages", "simulate", "simulate_actions",
           "SimResult", "PipelineRunner", "partition", "validate"]


def __getattr__(name):
    if name == "PipelineRunner":  # imports torch and MPI only when asked for
        from .runner import PipelineRunner

        return PipelineRunner
    raise AttributeError(f"module 'mpipar.pipeline' has no attribute {name!r}")
