"""comm.cost (alpha-beta model of ring collectives), bus factors, fit_alpha_beta, and
the "auto" algorithm choice. Pure: no MPI."""
from __future__ import annotations

import numpy as np
import pytest

from mpipar import MpiparError
from mpipar.comm import bus_factor, cost, fit_alpha_beta, tuning

ALPHA, BETA = 5e-6, 1e-9  # 5 us per step, 1 GB/s


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 64])
def test_cost_formulas(n):
    nbytes = 3 * 2**20
    assert cost("all_reduce", nbytes, n, ALPHA, BETA) == pytest.approx(
        2 * (n - 1) * ALPHA + 2 * (n - 1) / n * nbytes * BETA, rel=1e-12)
    for op in ("all_gather", "reduce_scatter"):
        assert cost(op, nbytes, n, ALPHA, BETA) == pytest.approx(
            (n - 1) * ALPHA + (n - 1) / n * nbytes * BETA, rel=1e-12)


def test_cost_hand_computed_values():
    # 4 ranks, 1 MB: all-reduce 6 steps of alpha + 1.5 MB of traffic per rank
    assert cost("all_reduce", 1e6, 4, 1e-5, 1e-9) == pytest.approx(6e-5 + 1.5e-3)
    assert cost("all_gather", 1e6, 4, 1e-5, 1e-9) == pytest.approx(3e-5 + 0.75e-3)
    assert cost("reduce_scatter", 1e6, 2, 0.0, 1e-9) == pytest.approx(0.5e-3)
    assert cost("all_reduce", 1e6, 1, 1.0, 1.0) == 0.0  # a single rank moves nothing


def test_ring_all_reduce_bandwidth_term_is_bounded():
    """Per rank a ring all-reduce moves 2(N-1)/N x size (< 2 x size), not 2(N-1) x size."""
    for n in (2, 8, 1024):
        t = cost("all_reduce", 1e9, n, 0.0, 1e-9)
        assert t < 2.0 and t == pytest.approx(2 * (n - 1) / n)
    assert cost("all_reduce", 1e9, 2, 0.0, 1e-9) == pytest.approx(1.0)


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    for n in (2, 3, 5):
        both = cost("reduce_scatter", 1e7, n, ALPHA, BETA) + cost("all_gather", 1e7, n, ALPHA, BETA)
        assert cost("all_reduce", 1e7, n, ALPHA, BETA) == pytest.approx(both)


@pytest.mark.parametrize("bad", [("broadcast", 2), ("all_reduce", 0), ("allreduce", 4)])
def test_cost_rejects_bad_input(bad):
    op, n = bad
    with pytest.raises(MpiparError):
        cost(op, 1024, n, ALPHA, BETA)


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter"])
@pytest.mark.parametrize("n", [2, 3, 4, 16])
def test_fit_recovers_alpha_beta(op, n):
    sizes = np.logspace(3, 8, 12)
    times = [cost(op, s, n, ALPHA, BETA) for s in sizes]
    alpha, beta = fit_alpha_beta(op, sizes, n, times)
    assert alpha == pytest.approx(ALPHA, rel=1e-6)
    assert beta == pytest.approx(BETA, rel=1e-6)


def test_fit_with_noise_is_close():
    rng = np.random.default_rng(0)
    sizes = np.logspace(3, 8, 40)
    times = np.array([cost("all_reduce", s, 4, ALPHA, BETA) for s in sizes])
    alpha, beta = fit_alpha_beta("all_reduce", sizes, 4, times * (1 + 0.01 * rng.standard_normal(sizes.size)))
    assert beta == pytest.approx(BETA, rel=0.02)
    assert alpha == pytest.approx(ALPHA, rel=0.2)


@pytest.mark.parametrize("args", [
    ("all_reduce", [1e3, 1e6], 1, [1.0, 2.0]),        # one rank moves nothing
    ("all_reduce", [1e3], 2, [1.0]),                  # one point
    ("all_reduce", [1e3, 1e6], 2, [1.0]),             # counts differ
    ("broadcast", [1e3, 1e6], 2, [1.0, 2.0]),         # no model
])
def test_fit_rejects_bad_input(args):
    with pytest.raises(MpiparError):
        fit_alpha_beta(*args)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_bus_factors_match_nccl_tests(n):
    assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    assert bus_factor("all_gather", n) == pytest.approx((n - 1) / n)
    assert bus_factor("reduce_scatter", n) == pytest.approx((n - 1) / n)
    assert bus_factor("all_to_all", n) == pytest.approx((n - 1) / n)
    assert bus_factor("broadcast", n) == 1.0
    assert bus_factor("send_recv", n) == 1.0


def test_bus_factor_unknown_op():
    with pytest.raises(MpiparError):
        bus_factor("scan", 4)


def test_busbw_of_the_model_approaches_one_over_beta():
    """busbw = algbw * factor, with the model's time, tends to 1/beta for big messages."""
    n, nbytes = 4, 1e10
    algbw = nbytes / cost("all_reduce", nbytes, n, ALPHA, BETA)
    assert algbw * bus_factor("all_reduce", n) == pytest.approx(1 / BETA, rel=1e-4)


def test_auto_choice_follows_the_crossover(monkeypatch):
    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        monkeypatch.delenv(f"MPIPAR_CROSSOVER_{op.upper()}", raising=False)
        monkeypatch.delenv(f"MPIPAR_RING_CEILING_{op.upper()}", raising=False)
        x = tuning.crossover(op)
        assert x > 0
        assert tuning.choose(op, "auto", x - 1, 4) == "mpi"
        assert tuning.choose(op, "auto", x, 4) == "ring"
        assert tuning.choose(op, "auto", 10 * x, 1) == "mpi"  # nothing to ring with one rank
        assert tuning.choose(op, "mpi", 10 * x, 4) == "mpi"
        assert tuning.choose(op, "ring", 1, 4) == "ring"
        monkeypatch.setenv(f"MPIPAR_CROSSOVER_{op.upper()}", "100")
        assert tuning.crossover(op) == 100
        assert tuning.choose(op, "auto", 99, 2) == "mpi" and tuning.choose(op, "auto", 100, 2) == "ring"


def test_auto_goes_back_to_mpi_at_the_ring_ceiling(monkeypatch):
    monkeypatch.setenv("MPIPAR_CROSSOVER_ALL_GATHER", "100")
    monkeypatch.setenv("MPIPAR_RING_CEILING_ALL_GATHER", "1000")
    assert [tuning.choose("all_gather", "auto", b, 2) for b in (99, 100, 999, 1000)] == ["mpi", "ring", "ring", "mpi"]
    monkeypatch.delenv("MPIPAR_RING_CEILING_ALL_GATHER")
    assert tuning.choose("all_gather", "auto", tuning.RING_CEILING_BYTES["all_gather"], 2) == "mpi"
    assert tuning.ring_ceiling("all_reduce") == tuning.NEVER
