"""The alpha-beta collective models now live with the planner (mpipar.plan.alpha_beta); kept importable here."""
from ..plan.alpha_beta import bus_factor, cost, fit_alpha_beta  # noqa: F401

__all__ = ["bus_factor", "cost", "fit_alpha_beta"]
