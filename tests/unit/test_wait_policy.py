"""mpipar.comm.wait.Backoff: the one wait policy (spin, then sched_yield, then growing capped sleeps).

A fake condition that turns true at a known check; time.sleep and os.sched_yield are
recorded, so each phase is seen to run (or not) without timing anything."""
from __future__ import annotations

import importlib

import pytest

W = importlib.import_module("mpipar.comm.wait")  # the module (mpipar.comm.wait is also a function)


class Ready:
    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.at


@pytest.fixture
def recorded(monkeypatch):
    log = {"sleep": [], "yield": 0}
    monkeypatch.setattr(W.time, "sleep", lambda s: log["sleep"].append(s))

    def count_yield():
        log["yield"] += 1

    monkeypatch.setattr(W.os, "sched_yield", count_yield)
    return log


def test_ready_at_once_neither_yields_nor_sleeps(recorded):
    fences = []
    W.Backoff(0.0, 0.0, 1e-6, 1e-4).wait(Ready(1), between=lambda: fences.append(1))
    assert recorded == {"sleep": [], "yield": 0} and fences == []


def test_sleeps_double_up_to_the_cap_and_fence_after_each(recorded):
    fences = []
    ready = Ready(8)
    W.Backoff(0.0, 0.0, 1e-6, 4e-6).wait(ready, between=lambda: fences.append(1))
    assert ready.calls == 8
    assert recorded["sleep"] == [1e-6, 2e-6, 4e-6, 4e-6, 4e-6, 4e-6]  # checks 2..7 fail, each then sleeps
    assert len(fences) == 6 and recorded["yield"] == 0


def test_spin_phase_checks_without_yielding_or_sleeping(recorded):
    ready = Ready(2000)
    W.Backoff(60.0, 120.0, 1e-6, 1e-4).wait(ready)
    assert ready.calls == 2000 and recorded == {"sleep": [], "yield": 0}


def test_yield_phase_yields_between_checks(recorded):
    ready = Ready(50)
    W.Backoff(0.0, 60.0, 1e-6, 1e-4).wait(ready)
    assert ready.calls == 50 and recorded["sleep"] == [] and recorded["yield"] == 49


def test_policy_by_oversubscription():
    assert W.backoff(True) is W.POLITE and W.backoff(False) is W.BUSY
    # politer when ranks outnumber cores: never spins or yields longer, never sleeps longer
    assert W.POLITE.spin_s <= W.BUSY.spin_s and W.POLITE.yield_s <= W.BUSY.yield_s
    assert W.POLITE.max_sleep <= W.BUSY.max_sleep


def test_request_polling_uses_the_policy(recorded, monkeypatch):
    """wait.poll (MPI requests, oversubscribed) runs POLITE: swapping it changes the waits."""
    monkeypatch.setattr(W, "POLITE", W.Backoff(0.0, 0.0, 3e-6, 3e-6))
    W.poll(Ready(4))
    assert recorded["sleep"] == [3e-6, 3e-6]


def test_share_lets_the_cap_grow_with_the_time_waited(recorded, monkeypatch):
    """With share > 0 the cap grows past max_sleep to share x the time waited (at most
    longest_sleep): a fake clock advances 1 ms per check."""
    clock = [0.0]

    def now():
        clock[0] += 1e-3
        return clock[0]

    monkeypatch.setattr(W.time, "perf_counter", now)
    W.Backoff(0.0, 0.0, 1e-6, 4e-6, share=0.5, longest_sleep=3e-3).wait(Ready(20))
    sleeps = recorded["sleep"]
    assert sleeps[:3] == [1e-6, 2e-6, 4e-6]  # doubling from first_sleep ...
    assert max(sleeps) == 3e-3 and sleeps[-1] == 3e-3  # ... then past max_sleep, up to longest_sleep
    assert all(b >= a for a, b in zip(sleeps, sleeps[1:]))
    recorded["sleep"].clear()
    W.Backoff(0.0, 0.0, 1e-6, 4e-6).wait(Ready(12))  # share 0: capped at max_sleep
    assert max(recorded["sleep"]) == 4e-6


def test_timer_slack_is_set_once_per_thread_before_sleeping(recorded, monkeypatch):
    calls = []
    monkeypatch.setattr(W, "_SLACK", W.threading.local())

    class Libc:
        def prctl(self, *args):
            calls.append(args)

    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    policy = W.Backoff(0.0, 0.0, 1e-6, 1e-6, timer_slack_ns=1000)
    policy.wait(Ready(1))  # ready at once: never sleeps, slack untouched
    assert calls == []
    policy.wait(Ready(3))
    policy.wait(Ready(3))
    assert calls == [(29, 1000, 0, 0, 0)]  # PR_SET_TIMERSLACK, once
