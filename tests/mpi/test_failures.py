"""Bad input raises MpiparError on EVERY rank with the same message, and never hangs.

Most cases differ on one rank only (the last), the case that would deadlock a
naive implementation. After each error the communicator must still work (no
stray messages left behind). The subprocess tests for whole jobs (wrong world
size, aborting on an unhandled exception) are in tests/unit/test_failures.py.
"""
from __future__ import annotations

import pytest
import torch

from mpipar import MpiparError, comm

pytestmark = pytest.mark.mpi


def cases(n, r):
    """name -> (needs at least this many ranks, call). `odd` is True on the last rank only."""
    odd = r == n - 1
    return {
        "shape_differs": (2, lambda w: comm.all_reduce(torch.zeros(3 + odd), w)),
        # one rank small enough to ride along with the agreement (mpipar.comm.agreement.inline), one not
        "shape_differs_small_vs_large": (2, lambda w: comm.all_reduce(torch.zeros(3 + 5000 * odd), w)),
        "shape_differs_large": (2, lambda w: comm.all_reduce(torch.zeros(5000 + odd), w)),
        "dtype_differs_small_bf16": (2, lambda w: comm.all_reduce(
            torch.zeros(3, dtype=torch.bfloat16 if odd else torch.float32), w)),
        "algorithm_differs_shm_small": (2, lambda w: comm.all_reduce(torch.zeros(3), w,
                                                                     algorithm="shm" if odd else "mpi")),
        "dtype_differs": (2, lambda w: comm.all_reduce(torch.zeros(3, dtype=torch.float64 if odd else torch.float32),
                                                       w)),
        "ndim_differs": (2, lambda w: comm.all_gather(torch.zeros((2, 1) if odd else (2,)), w)),
        "unknown_op_one_rank": (2, lambda w: comm.all_reduce(torch.zeros(3), w, op="avg" if odd else "sum")),
        "unknown_algorithm_one_rank": (2, lambda w: comm.all_reduce(torch.zeros(3), w,
                                                                    algorithm="tree" if odd else "ring")),
        "op_differs": (2, lambda w: comm.reduce_scatter(torch.zeros(4), w, op="max" if odd else "sum")),
        "algorithm_differs": (2, lambda w: comm.all_gather(torch.zeros(4), w, algorithm="mpi" if odd else "ring")),
        "gather_other_dim_differs": (2, lambda w: comm.all_gather(torch.zeros(2, 3 + odd), w, dim=0)),
        "gather_dim_differs": (2, lambda w: comm.all_gather(torch.zeros(2, 2), w, dim=int(odd))),
        "broadcast_root_differs": (2, lambda w: comm.broadcast(torch.zeros(3), w, root=int(odd))),
        "unknown_op_everywhere": (1, lambda w: comm.all_reduce(torch.zeros(3), w, op="mean")),
        "unknown_algorithm_everywhere": (1, lambda w: comm.reduce_scatter(torch.zeros(3), w, algorithm="tree")),
        "dim_out_of_range": (1, lambda w: comm.reduce_scatter(torch.zeros(3), w, dim=2)),
        "reduce_scatter_0d": (1, lambda w: comm.reduce_scatter(torch.tensor(1.0), w)),
        "dim_out_of_range_one_rank": (2, lambda w: comm.all_gather(torch.zeros(2, 2), w, dim=5 if odd else 0)),
        "broadcast_root_out_of_range": (1, lambda w: comm.broadcast(torch.zeros(3), w, root=n)),
        "all_to_all_gather_dim_out_of_range": (1, lambda w: comm.all_to_all(torch.zeros(n, 2), w, 0, 3)),
        "all_to_all_indivisible": (2, lambda w: comm.all_to_all(torch.zeros(n + 1, 2), w, 0, 1)),
        "all_to_all_shape_differs": (2, lambda w: comm.all_to_all(torch.zeros(n, 2 + odd), w, 0, 1)),
    }


def error_of(call, world):
    try:
        call(world)
    except MpiparError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", sorted(cases(2, 0)))
def test_bad_input_raises_on_every_rank(world, name):
    need, call = cases(world.size, world.rank)[name]
    if world.size < need:
        pytest.skip(f"needs {need} ranks")
    msgs = world.allgather(error_of(call, world))
    x = torch.ones(5)
    comm.all_reduce(x, world, algorithm="ring")  # still in step afterwards
    y = comm.all_gather(torch.full((1,), float(world.rank)), world)
    assert None not in msgs, f"ranks without an error: {[r for r, m in enumerate(msgs) if m is None]}"
    assert len(set(msgs)) == 1, msgs
    assert torch.equal(x, torch.full((5,), float(world.size)))
    assert y.tolist() == [float(i) for i in range(world.size)]


def test_error_names_the_problem(world):
    n = world.size
    msg = error_of(lambda w: comm.all_reduce(torch.zeros(3), w, op="mean"), world)
    assert msg is not None and "unknown op" in msg and "sum" in msg, msg
    if n > 1:
        msg = error_of(lambda w: comm.all_reduce(torch.zeros(3 + (w.rank == n - 1)), w), world)
        assert msg is not None and "(3,)" in msg and "(4,)" in msg, msg


def test_mpipar_error_is_a_value_error():
    assert issubclass(MpiparError, ValueError)


def test_agree_helpers(world):
    """mpipar.agree.agree / agree_ints / require: one rank's problem becomes every rank's error."""
    from mpipar.errors import require
    from mpipar.agree import agree, agree_ints

    n, last = world.size, world.rank == world.size - 1
    agree(world, None)  # nobody failed: no error
    with pytest.raises(MpiparError) as info:
        agree(world, "bad thing" if last else None)
    msgs = world.allgather(str(info.value))
    assert len(set(msgs)) == 1 and "bad thing" in msgs[0]
    assert list(agree_ints(world, [3, 4], lambda lo, hi: "differ")) == [3, 4]
    if n > 1:
        with pytest.raises(MpiparError) as info:
            agree_ints(world, [3, 5 if last else 4], lambda lo, hi: f"values differ: min {lo.tolist()} max {hi.tolist()}")
        msgs = world.allgather(str(info.value))
        assert len(set(msgs)) == 1 and "min [3, 4] max [3, 5]" in msgs[0], msgs
    require(True, "never raised")
    with pytest.raises(MpiparError, match="always raised"):
        require(False, "always raised")
