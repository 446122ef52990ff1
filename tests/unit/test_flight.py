"""The flight recorder, the watchdog's check, the verdict and the abort hooks, without MPI.

The verdict runs on synthetic records (mismatched op, a missing rank, different
shapes, a rank without a record, a point-to-point wait, all agree); the
recorder's ring wraps at its capacity; the hooks install once and chain.
The same machinery in real `mpiexec` jobs: tests/unit/test_flight_jobs.py.
"""
from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import torch

from mpipar.errors import MpiparError
from mpipar.flight.abort import install_abort_on_exception
from mpipar.flight import __main__ as flight_main
from mpipar.flight.dump import dump as flight_dump
from mpipar import settings
from mpipar.flight import recorder
from mpipar.flight.verdict import analyse, load
from mpipar.flight.watchdog import Watchdog, describe


class Chan:
    """A channel as the recorder sees one (an mpipar Group has the same attributes)."""

    def __init__(self, name="world", ranks=(0, 1)):
        self.name, self.world_ranks, self.flight_counts = name, tuple(ranks), recorder.counts()


IMPLEMENTATIONS = ["Python"] + (["C"] if recorder.IMPLEMENTATION == "C" else [])
_C = {name: getattr(recorder, name) for name in recorder.PYTHON}  # what the module runs (C where it built)


@pytest.fixture(autouse=True, params=IMPLEMENTATIONS)
def clean_recorder(request, monkeypatch):
    """Every test here runs on the pure-Python recorder and on the C one (mpipar.flight.ring),
    where it built: the C one must keep the same records."""
    recorder.reset()
    if request.param == "Python":
        for name, fn in recorder.PYTHON.items():
            monkeypatch.setattr(recorder, name, fn)
    recorder.reset()
    yield request.param
    recorder.reset()
    monkeypatch.undo()
    recorder.reset()


def test_the_c_recorder_builds_where_a_compiler_and_headers_are():
    """Without this, the C tests would silently not run: a machine with cc and Python.h builds it."""
    import os
    import sysconfig

    from mpipar.native import compiler

    if compiler() is None or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no C compiler or no Python.h")
    if settings.current().flight_c == "0":
        pytest.skip("MPIPAR_FLIGHT_C=0")
    assert recorder.IMPLEMENTATION == "C" and _C["begin"] is not recorder.PYTHON["begin"]


# -- synthetic records -----------------------------------------------------------------------
def call(seq, op="all_reduce", ranks=(0, 1, 2), group="world", shape=(1024,), dtype="float32", waiting=False,
         start=100.0, kind="collective", peer=None):
    c = {"seq": seq, "op": op, "kind": kind, "group": group, "ranks": list(ranks), "peer": peer, "dtype": dtype,
         "shape": list(shape), "bytes": 4 * int(torch.tensor(shape).prod()), "algorithm": "auto",
         "start": start + seq, "done": not waiting}
    if waiting:
        c["waited"] = 5.2
    return c


def rec(rank, calls, size=3):
    return {"format": 3, "rank": rank, "world_size": size, "job": "host:1", "reason": "watchdog", "message": None,
            "time": 200.0, "recorded": len(calls), "capacity": 256, "calls": calls}


def test_verdict_all_agree():
    records = {r: rec(r, [call(1), call(2)]) for r in range(3)}
    v = analyse(records)
    assert v.agree and not v.findings and v.absent == []
    assert "the ranks agree" in str(v)


def test_verdict_names_the_rank_that_never_arrived_and_its_last_call():
    records = {0: rec(0, [call(1), call(2), call(3, waiting=True)]),
               1: rec(1, [call(1), call(2, shape=(1024,)), call(1, op="broadcast", group="tp", ranks=(1, 2))]),
               2: rec(2, [call(1), call(2), call(3, waiting=True)])}
    v = analyse(records)
    assert not v.agree
    f = v.findings[0]
    assert (f.kind, f.op, f.seq, f.waiting, f.missing) == ("hang", "all_reduce", 3, [0, 2], [1])
    text = str(v)
    assert "verdict: all_reduce #3 on group world [0, 1, 2]: ranks [0, 2] waited" in text
    assert "rank 1 never arrived (its last call on this group: #2); its last call: broadcast #1 on group tp [1, 2]" \
        in text


def test_verdict_names_the_rank_that_failed():
    records = {r: rec(r, [call(1), call(2, waiting=r != 1)]) for r in range(3)}
    records[1].update(reason="exception", message="unhandled ValueError in the main thread: x")
    records[1]["calls"].pop()
    v = analyse(records)
    assert v.failed == [1] and not v.agree and v.findings[0].missing == [1]
    assert "verdict: rank 1 failed (unhandled ValueError in the main thread: x); then all_reduce #2" in str(v)
    records = {1: records[1]}
    assert "verdict: rank 1 failed" in str(analyse(records))


def test_verdict_names_a_rank_without_a_record():
    records = {0: rec(0, [call(1), call(2, waiting=True)]), 2: rec(2, [call(1), call(2, waiting=True)])}
    v = analyse(records)
    assert v.absent == [1]
    assert v.findings[0].missing == [1]
    assert "rank 1 never arrived; it left no record" in str(v)


def test_verdict_mismatched_op():
    records = {0: rec(0, [call(1), call(2, op="all_reduce", waiting=True)], size=2),
               1: rec(1, [call(1), call(2, op="broadcast", waiting=True)], size=2)}
    v = analyse(records)
    f = v.findings[0]
    assert (f.kind, f.seq) == ("mismatch", 2)
    assert "mismatched op at call #2 on group world [0, 1, 2]: rank 0: all_reduce, rank 1: broadcast" in str(v)


def test_verdict_different_shapes_and_dtypes():
    records = {0: rec(0, [call(1), call(2, shape=(4, 8))]), 1: rec(1, [call(1), call(2, shape=(8, 4))]),
               2: rec(2, [call(1), call(2, shape=(4, 8))])}
    v = analyse(records)
    assert v.findings[0].kind == "mismatch" and v.findings[0].seq == 2
    assert "different shapes at call #2" in str(v) and "rank 1: float32 [8, 4]" in str(v)
    records[1]["calls"][1].update(shape=[4, 8], dtype="float64")
    assert "different dtypes at call #2" in str(analyse(records))


def test_verdict_point_to_point_wait_names_the_peer():
    records = {0: rec(0, [call(1, op="recv", kind="p2p", peer=1, group="pipeline", ranks=(0, 1), waiting=True)], 2),
               1: rec(1, [call(1), call(4, op="all_reduce", group="dp", ranks=(1,))], 2)}
    v = analyse(records)
    f = [f for f in v.findings if f.kind == "p2p"][0]
    assert f.waiting == [0] and f.missing == [1]
    assert "rank 0 waited 5.2 s in recv #1 on group pipeline [0, 1] for rank 1" in str(v)
    assert "rank 1 is in no mpipar call; its last call: all_reduce #4 on group dp [1]" in str(v)


def test_verdict_on_a_wait_whose_group_is_not_known():
    records = {0: rec(0, [call(1), call(1, op="wait", group="unknown", ranks=(), waiting=True)], 2),
               1: rec(1, [call(1)], 2)}
    v = analyse(records)
    f = v.findings[0]
    assert (f.kind, f.op, f.waiting, f.missing) == ("wait", "wait", [0], [1])
    assert "rank 0 waited 5.2 s in wait #1 (group not known)" in str(v)
    assert "rank 1 is in no mpipar call; its last call: all_reduce #1" in str(v)


def test_verdict_ignores_records_of_another_job(tmp_path):
    records = {r: rec(r, [call(1), call(2, waiting=r != 1)]) for r in range(3)}
    records[1]["job"] = "host:999"
    v = analyse(records)
    assert "ignoring the records of ranks [1]" in str(v)
    assert v.absent == [1] and v.findings[0].missing == [1]


# -- the recorder ------------------------------------------------------------------------------
def test_recorder_ring_wraps_and_keeps_the_last_calls():
    ch = Chan()
    t = torch.zeros(3, 5, dtype=torch.float64)
    for _ in range(recorder.CAPACITY + 44):
        recorder.done(recorder.begin(ch, "all_reduce", t.dtype, t.shape, "auto"))
    calls = recorder.calls()
    assert len(calls) == recorder.CAPACITY
    assert [c["seq"] for c in calls] == list(range(45, recorder.CAPACITY + 45))
    last = calls[-1]
    assert (last["op"], last["dtype"], last["shape"], last["bytes"], last["ranks"]) == \
        ("all_reduce", "float64", [3, 5], 120, [0, 1])
    assert all(c["done"] for c in calls) and [c["index"] for c in calls] == list(range(44, recorder.CAPACITY + 44))
    assert recorder.count() == recorder.CAPACITY + 44


def test_recorder_nested_calls_record_the_outermost_and_p2p_counts_apart():
    ch = Chan()
    outer = recorder.begin(ch, "all_reduce")
    assert recorder.begin(ch, "Allgather") == -1  # nested: the all_reduce stands for it
    assert recorder.in_flight()[0] == outer
    recorder.done(-1)
    assert recorder.in_flight()[0] == outer
    recorder.done(outer)
    assert recorder.in_flight() is None
    recorder.done(recorder.begin_p2p(ch, "recv", 1))
    calls = recorder.calls()
    assert [(c["op"], c["seq"], c["kind"], c["peer"]) for c in calls] == \
        [("all_reduce", 1, "collective", None), ("recv", 1, "p2p", 1)]


def test_a_finished_call_has_its_end_time_and_one_in_flight_none():
    ch = Chan()
    slot = recorder.begin(ch, "all_reduce")
    assert recorder.calls()[-1]["end"] is None
    time.sleep(0.01)
    recorder.done(slot)
    call = recorder.calls()[-1]
    assert call["done"] and call["end"] - call["start"] >= 0.009


def test_a_call_begun_without_dtype_takes_its_description_and_only_its_own():
    """all_reduce leaves dtype and shape to its agreement (recorder.described); the record has
    them while the call waits and after it ends, and a later call in the same slot without one
    shows none (no stale description)."""
    ch = Chan()
    slot = recorder.begin(ch, "all_reduce")
    recorder.described.info = recorder.Description(torch.float64, torch.Size([2, 3]))
    assert recorder.calls()[-1]["shape"] == [2, 3] and not recorder.calls()[-1]["done"]
    recorder.done(slot)
    recorder.done(recorder.begin(ch, "broadcast"))
    recorder.note(torch.int32, (5,))  # no call in flight: ignored
    first = recorder.calls()
    assert [(c["op"], c["dtype"], c["shape"], c["bytes"]) for c in first] == \
        [("all_reduce", "float64", [2, 3], 48), ("broadcast", None, None, None)]
    for _ in range(recorder.CAPACITY - 1):
        recorder.done(recorder.begin(ch, "wait"))
    calls = recorder.calls()
    assert calls[-1]["index"] == recorder.CAPACITY and calls[-1]["op"] == "wait"  # slot 0 again
    assert all(c["dtype"] is None and c["shape"] is None for c in calls), [c for c in calls if c["dtype"]]


def test_watchdog_fires_on_a_call_waiting_past_the_timeout():
    ch = Chan(ranks=(0, 3))
    fired = []
    dog = Watchdog(0.05, on_expiry=lambda i, waited: fired.append((i, waited)))
    assert not dog.check()  # nothing in flight
    slot = recorder.begin(ch, "all_reduce")
    assert not dog.check()  # not yet
    time.sleep(0.08)
    assert dog.check() and fired and fired[0][0] == slot and fired[0][1] >= 0.05
    assert describe(slot, 7.25) == "mpipar watchdog: rank 0 waited 7.2 s in all_reduce #1 on group [0, 3] (world)"
    recorder.done(slot)
    slot = recorder.begin_p2p(ch, "recv", 1)
    assert describe(slot, 1.0).endswith("in recv #1 on group [0, 3] (world, peer rank 3)")
    recorder.done(slot)


def test_dump_and_the_command_line(tmp_path, capsys):
    ch = Chan(ranks=(0,))
    recorder.done(recorder.begin(ch, "all_reduce", torch.float32, (4,)))
    slot = recorder.begin(ch, "broadcast", torch.float32, (4,))
    path = flight_dump("signal", directory=str(tmp_path))
    recorder.done(slot)
    data = json.loads(open(path).read())
    assert path.endswith("rank0.json") and data["reason"] == "signal"
    assert [c["done"] for c in data["calls"]] == [True, False] and data["calls"][1]["waited"] >= 0
    assert load(str(tmp_path))[0]["calls"][0]["op"] == "all_reduce"
    assert flight_main.main([str(tmp_path)]) == 1  # rank 0 waits in broadcast #2
    assert "broadcast #2 on group world [0]" in capsys.readouterr().out
    assert flight_main.main([str(tmp_path / "none")]) == 2


def test_settings_parsed_and_checked():
    s = settings.Settings.from_environ({"MPIPAR_TIMEOUT": "2.5", "MPIPAR_FLIGHT_DIR": "/tmp/x",
                                        "MPIPAR_ABORT_ON_ERROR": "0"})
    assert (s.timeout, s.flight_dir, s.abort_on_error) == (2.5, "/tmp/x", "0")
    d = settings.Settings.from_environ({})
    assert (d.timeout, d.flight_dir, d.abort_on_error) == (600.0, "mpipar-flight", "1")
    assert settings.Settings.from_environ({"MPIPAR_TIMEOUT": "0"}).timeout == 0.0
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(MpiparError, match="MPIPAR_TIMEOUT"):
            settings.Settings.from_environ({"MPIPAR_TIMEOUT": bad})


# -- the hooks -------------------------------------------------------------------------------
def test_abort_hooks_install_once_and_chain(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(("main", a[0])))
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(("thread", args.exc_type)))
    install_abort_on_exception()
    hook, thread_hook = sys.excepthook, threading.excepthook
    install_abort_on_exception()  # idempotent
    assert sys.excepthook is hook and threading.excepthook is thread_hook
    assert getattr(hook, "_mpipar_abort_hook") and not getattr(hook.previous, "_mpipar_abort_hook", False)
    # no MPI job here (one process): the hooks chain and return instead of aborting
    hook(ValueError, ValueError("x"), None)
    worker = threading.Thread(target=lambda: 1 / 0)
    worker.start()
    worker.join()
    assert seen == [("main", ValueError), ("thread", ZeroDivisionError)]
