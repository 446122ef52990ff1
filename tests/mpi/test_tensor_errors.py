"""Bad sizes, mismatched groups and wrong inputs raise MpiparError on EVERY rank, without hanging.

After every error the group must still be in step: `in_step()` runs a collective.
"""
import pytest
import torch
from mpi4py import MPI

import mpipar
from mpipar import MpiparError, comm
from mpipar.tensor import (ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, RowParallelLinear,
                           VocabParallelEmbedding, vocab_parallel_cross_entropy)

pytestmark = pytest.mark.mpi

W = MPI.COMM_WORLD
N, R = W.Get_size(), W.Get_rank()
needs_two = pytest.mark.skipif(N < 2, reason="needs at least 2 ranks")


def in_step():
    assert comm.all_reduce(torch.ones(1), W).item() == N


def raises(fn, match=None):
    with pytest.raises(MpiparError, match=match):
        fn()
    in_step()


@needs_two
@pytest.mark.parametrize("build", [
    lambda: ColumnParallelLinear(4, 4 * N + 1, W),
    lambda: RowParallelLinear(4 * N + 1, 4, W),
    lambda: ParallelMLP(8, 4 * N + 1, W),
    lambda: ParallelSelfAttention(4 * (N + 1), N + 1, W),
    lambda: VocabParallelEmbedding(4 * N + 1, 4, W),
    lambda: ColumnParallelLinear(4, 3 * N + 1, W, stride=3),
], ids=["column", "row", "mlp", "heads", "vocab", "stride"])
def test_indivisible_sizes(build):
    raises(build, "divisible")


@pytest.mark.parametrize("build", [
    lambda: ColumnParallelLinear(0, 4 * N, W),
    lambda: RowParallelLinear(4 * N, -1, W),
    lambda: ParallelSelfAttention(10, 4 * N, W) if N > 1 else ParallelSelfAttention(10, 4, W),
    lambda: ColumnParallelLinear(4, 4 * N, W, gather_output=True, sequence_parallel=True),
    lambda: RowParallelLinear(4 * N, 4, W, input_is_parallel=False, sequence_parallel=True),
    lambda: ParallelSelfAttention(4 * N, N, W, sp_mode="ring"),
    lambda: ParallelSelfAttention(4 * N, N, W, sp_mode="flash", sp_group=W),
    lambda: ColumnParallelLinear(4, 4 * N, None),
    lambda: ColumnParallelLinear(4, 4 * N, "world"),
], ids=["zero", "negative", "hidden-heads", "gather+sp", "row-sp-not-parallel", "mode-no-group",
        "unknown-mode", "no-group", "not-a-group"])
def test_bad_constructor_arguments(build):
    raises(build)


@needs_two
def test_sp_group_equal_to_tp_group():
    raises(lambda: ParallelSelfAttention(4 * N, N, W, sp_group=W, sp_mode="ring"), "same ranks")


@needs_two
@pytest.mark.parametrize("build", [
    lambda: ColumnParallelLinear(4 + (R == 1), 4 * N, W),
    lambda: RowParallelLinear(4 * N, 4, W, seed=R),
    lambda: ParallelMLP(8, 4 * N, W, sequence_parallel=R == 0),
    lambda: VocabParallelEmbedding(4 * N * (1 + (R == N - 1)), 4, W),
    lambda: ColumnParallelLinear(4, 4 * N + (R > 0), W),  # only ranks > 0 would fail the divisibility check
    lambda: ParallelSelfAttention(4 * N, N, W, sp_mode="ring" if R == 0 else None),
], ids=["column", "row-seed", "mlp-sp", "vocab", "column-indivisible-on-some", "attention-sp-mode"])
def test_constructor_arguments_differ_across_ranks(build):
    raises(build, "differ")


@pytest.mark.parametrize("layer,x", [
    (lambda: ColumnParallelLinear(6, 4 * N, W), torch.zeros(2, 3, 5)),
    (lambda: RowParallelLinear(4 * N, 6, W), torch.zeros(2, 3, 4 * N)),  # input_is_parallel: wants 4
    (lambda: RowParallelLinear(4 * N, 6, W, input_is_parallel=False), torch.zeros(2, 3, 4)),
    (lambda: ParallelMLP(6, 4 * N, W), torch.zeros(2, 3, 7)),
    (lambda: ParallelSelfAttention(4 * N, 2 * N, W), torch.zeros(2, 3, 4 * N + 2)),
    (lambda: ParallelMLP(6, 4 * N, W), torch.zeros(2, 3, 6, dtype=torch.long)),
    (lambda: ColumnParallelLinear(6, 4 * N, W), torch.zeros(6)),
], ids=["column", "row", "row-full", "mlp", "attention", "int-input", "1d"])
def test_wrong_input_shape(layer, x):
    if N == 1 and x.shape[-1] == 4 * N:
        pytest.skip("the full and the local size coincide at N = 1")
    m = layer()
    raises(lambda: m(x), "expected")


@needs_two
def test_wrong_input_shape_on_one_rank_only():
    """Only the last rank gets a bad input: every rank still raises (no rank enters a collective alone)."""
    mlp = ParallelMLP(6, 4 * N, W)
    x = torch.zeros(2, 3, 7 if R == N - 1 else 6)
    raises(lambda: mlp(x), "expected last dim 6")
    row = RowParallelLinear(4 * N, 6, W)
    raises(lambda: row(torch.zeros(2, 3 + R, 4)), "differ")  # consistent features, different sequence


@needs_two
def test_sequence_parallel_length_not_divisible():
    row = RowParallelLinear(4 * N, 6, W, sequence_parallel=True)
    raises(lambda: row(torch.zeros(2, 2 * N + 1, 4)), "not divisible")
    emb = VocabParallelEmbedding(4 * N, 4, W, sequence_parallel=True)
    raises(lambda: emb(torch.zeros(2, 2 * N + 1, dtype=torch.long)), "not divisible")


def test_ids_and_targets_out_of_range():
    emb = VocabParallelEmbedding(4 * N, 4, W)
    raises(lambda: emb(torch.tensor([[0, 4 * N]])), "ids must be in")
    raises(lambda: emb(torch.tensor([[0, 1]]) - int(R == N - 1)), "ids must be in")  # bad on one rank only
    raises(lambda: emb(torch.zeros(2, 3)), "integer")
    shard = torch.zeros(2, 3, 4)
    raises(lambda: vocab_parallel_cross_entropy(shard, torch.full((2, 3), 4 * N), W), "ids must be in")
    raises(lambda: vocab_parallel_cross_entropy(shard, torch.zeros(2, 4, dtype=torch.long), W), "targets shape")


@needs_two
def test_cross_entropy_shards_differ():
    shard = torch.zeros(2, 3, 4 + R)
    raises(lambda: vocab_parallel_cross_entropy(shard, torch.zeros(2, 3, dtype=torch.long), W), "differ")


def test_from_serial_keeps_checks():
    if N == 1:
        pytest.skip("everything divides by 1")
    torch.manual_seed(0)
    raises(lambda: ColumnParallelLinear.from_serial(torch.nn.Linear(4, 4 * N + 1), W), "divisible")
    raises(lambda: ParallelSelfAttention.from_serial(mpipar.models.SelfAttention(N + 1, N + 1), W), "divisible")
