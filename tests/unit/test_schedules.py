"""Pipeline schedules as data and their validator: pure tests, no MPI, no torch."""
import pytest

from mpipar.errors import MpiparError
from mpipar.pipeline import SCHEDULES, Action, all_stages, schedule, validate
from mpipar.pipeline.validate import messages

P_RANGE = range(1, 9)
M_RANGE = range(1, 33)


def F(i, c=0):
    return Action("F", i, c)


def B(i, c=0):
    return Action("B", i, c)


def W(i, c=0):
    return Action("W", i, c)


def pipedream_flush(p, m, s):
    """Reference PipeDream-Flush order, written out the way the paper describes it."""
    warm = min(p - s - 1, m)
    order, next_f, next_b = [], 0, 0
    while next_f < warm:
        order.append(F(next_f))
        next_f += 1
    while next_f < m:  # steady state: one forward, then one backward
        order.append(F(next_f))
        next_f += 1
        order.append(B(next_b))
        next_b += 1
    while next_b < m:
        order.append(B(next_b))
        next_b += 1
    return order


def interleaved_ok(p, m):
    return m <= p or m % p == 0


@pytest.mark.parametrize("name", ["naive", "gpipe", "1f1b", "zb-h1"])
def test_every_schedule_validates(name):
    for p in P_RANGE:
        for m in M_RANGE:
            validate(all_stages(name, p, m), m)


@pytest.mark.parametrize("v", [1, 2, 3, 4])
def test_interleaved_validates(v):
    for p in P_RANGE:
        for m in M_RANGE:
            if interleaved_ok(p, m):
                validate(all_stages("interleaved-1f1b", p, m, v), m, v)


@pytest.mark.parametrize("name", ["naive", "gpipe"])
def test_naive_and_gpipe_with_chunks_validate(name):
    for p in range(1, 6):
        for m in range(1, 9):
            validate(all_stages(name, p, m, 3), m, 3)


def test_1f1b_is_pipedream_flush():
    for p in P_RANGE:
        for m in M_RANGE:
            for s in range(p):
                assert schedule("1f1b", p, m, s) == pipedream_flush(p, m, s), (p, m, s)


def test_1f1b_written_out():
    assert schedule("1f1b", 4, 6, 0) == [F(0), F(1), F(2), F(3), B(0), F(4), B(1), F(5), B(2), B(3), B(4), B(5)]
    assert schedule("1f1b", 4, 6, 2) == [F(0), F(1), B(0), F(2), B(1), F(3), B(2), F(4), B(3), F(5), B(4), B(5)]
    assert schedule("1f1b", 4, 6, 3) == [x for i in range(6) for x in (F(i), B(i))]
    assert schedule("1f1b", 4, 2, 0) == [F(0), F(1), B(0), B(1)]  # m < p: warm-up capped at m


def test_gpipe_and_naive_orders():
    assert schedule("gpipe", 3, 3, 1) == [F(0), F(1), F(2), B(0), B(1), B(2)]
    assert schedule("naive", 3, 3, 2) == [F(0), B(0), F(1), B(1), F(2), B(2)]
    assert schedule("gpipe", 2, 2, 0, num_chunks=2) == [F(0), F(1), F(0, 1), F(1, 1), B(0, 1), B(1, 1),
                                                          B(0), B(1)]


def test_interleaved_one_chunk_is_1f1b():
    for p in P_RANGE:
        for m in range(1, 17):
            for s in range(p):
                assert schedule("interleaved-1f1b", p, m, s, 1) == schedule("1f1b", p, m, s)


def test_interleaved_megatron_order():
    p, m, v = 2, 4, 2
    s0 = schedule("interleaved-1f1b", p, m, 0, v)
    # warm-up 2*(p-s-1) + (v-1)*p = 4 chunk-forwards, in groups of p microbatches, chunk by chunk
    assert s0[:4] == [F(0), F(1), F(0, 1), F(1, 1)]
    assert s0[4:8] == [F(2), B(0, 1), F(3), B(1, 1)]
    assert s0[-4:] == [B(2, 1), B(3, 1), B(2), B(3)]
    last = schedule("interleaved-1f1b", p, m, 1, v)
    assert last[:3] == [F(0), F(1), F(0, 1)]  # warm-up (v-1)*p = 2, then 1F1B
    assert last[3] == B(0, 1)


def test_zb_h1_is_1f1b_plus_deferred_w():
    for p in P_RANGE:
        for m in M_RANGE:
            for s in range(p):
                acts = schedule("zb-h1", p, m, s)
                assert [a for a in acts if a.op != "W"] == schedule("1f1b", p, m, s)
                pos = {a: n for n, a in enumerate(acts)}
                assert all(pos[W(i)] > pos[B(i)] for i in range(m))
                assert [a.microbatch for a in acts if a.op == "W"] == list(range(m))


def test_zb_h1_defers_w_by_stage():
    last = schedule("zb-h1", 4, 8, 3)
    assert last[:9] == [F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3), W(0)]
    first = schedule("zb-h1", 4, 8, 0)
    assert first[:7] == [F(0), F(1), F(2), F(3), B(0), W(0), F(4)]


def test_schedule_names():
    assert {"naive", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1"} <= set(SCHEDULES)


@pytest.mark.parametrize("args", [
    ("nope", 2, 4, 0, 1),
    ("1f1b", 2, 4, 2, 1),           # stage out of range
    ("1f1b", 2, 4, -1, 1),
    ("1f1b", 0, 4, 0, 1),
    ("gpipe", 2, 0, 0, 1),
    ("1f1b", 2, 4, 0, 2),           # 1f1b runs one chunk
    ("zb-h1", 2, 4, 0, 2),
    ("interleaved-1f1b", 2, 5, 0, 2),  # m > p and m % p != 0
    ("gpipe", 2, 4, 0, 0),
])
def test_bad_arguments_raise(args):
    with pytest.raises(MpiparError):
        schedule(*args)


def test_action_rejects_unknown_op():
    with pytest.raises(MpiparError):
        Action("X", 0)
    assert str(Action("W", 3, 1)) == "W3.1" and str(F(2)) == "F2"


def test_validator_reports_deadlock():
    lists = [[F(0), B(0), F(1), B(1)], [F(1), B(1), F(0), B(0)]]
    with pytest.raises(MpiparError, match="deadlock"):
        validate(lists, 2)


def test_validator_catches_missing_duplicate_and_order():
    good = all_stages("1f1b", 2, 2)
    validate(good, 2)
    with pytest.raises(MpiparError, match="missing"):
        validate([good[0][:-1], good[1]], 2)
    with pytest.raises(MpiparError, match="appears 2 times"):
        validate([good[0] + [F(0)], good[1]], 2)
    with pytest.raises(MpiparError, match="comes before"):
        validate([[B(0), F(0), F(1), B(1)], good[1]], 2)
    with pytest.raises(MpiparError, match="comes before"):
        validate([[F(0), W(0), B(0), F(1), B(1)], good[1]], 2)
    with pytest.raises(MpiparError, match="outside"):
        validate([good[0] + [F(5)], good[1]], 2)
    with pytest.raises(MpiparError, match="comes before"):  # chunk 1 before chunk 0 on one stage
        validate([[F(0, 1), F(0), B(0, 1), B(0)]], 1, 2)


def test_messages_pair_up():
    p, m, v = 3, 3, 2
    lists = all_stages("interleaved-1f1b", p, m, v)
    sends, recvs = [], []
    for s, acts in enumerate(lists):
        for kind, _, peer, _, key in messages(acts, s, p, v):
            (sends if kind == "send" else recvs).append((s, peer, key) if kind == "send" else (peer, s, key))
    assert sorted(sends) == sorted(recvs)
    # every virtual-stage boundary carries one activation and one gradient per microbatch
    assert len(sends) == 2 * m * (p * v - 1)
    # the chunk wrap: stage 2 (chunk 0, virtual stage 2) feeds stage 0 (chunk 1, virtual stage 3)
    assert (2, 0, (0, 0, 3)) in sends
