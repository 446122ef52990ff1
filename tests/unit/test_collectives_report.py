"""experiments/_collectives_report.py: the benchmark targets read from a sweep's points.

Synthetic points with known times: each verdict must print the ratio those times imply,
at the size where it is smallest, and skip what the sweep did not measure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))

from _collectives_report import human, one_copy_verdict, shm_verdicts, verdicts  # noqa: E402

MiB = 1 << 20


def point(op, impl, nbytes, busbw, n=2):
    # shm_verdicts reads busbw, verdicts reads time_s: make them consistent (busbw = bytes / time)
    return {"op": op, "impl": impl, "nbytes": nbytes, "world_size": n, "busbw_GBps": busbw,
            "time_s": nbytes / (busbw * 1e9)}


def line(lines, start):
    found = [s for s in lines if s.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


def test_human_sizes():
    assert [human(4096), human(16 * MiB), human(3 << 30), human(1000)] == ["4 KiB", "16 MiB", "3 GiB", "1000 B"]


def test_shm_ratios_take_the_worst_size():
    rows = [point("all_reduce", "auto_sym", s, bw) for s, bw in ((16 * MiB, 20.0), (64 * MiB, 12.0))]
    rows += [point("all_reduce", "mpi4py", s, 3.0) for s in (16 * MiB, 64 * MiB)]
    rows += [point("inplace", "inplace", s, 30.0) for s in (16 * MiB, 64 * MiB)]
    out = shm_verdicts(rows)
    assert "min 4.00 (target >= 4)" in line(out, "all_reduce 16 MiB-64 MiB: busbw auto_sym / mpi4py")
    assert "min 0.40 (target >= 0.5)" in line(out, "all_reduce >= 16 MiB: busbw auto_sym / inplace limit (timed apart)")
    assert not [s for s in out if "inplace_sym" in s or "side by side" in s or s.startswith("all_gather")]  # not measured
    rows += [point("all_reduce", "inplace", s, 20.0) for s in (16 * MiB, 64 * MiB)]  # the same pass, in the rounds
    out = shm_verdicts(rows)
    side_by_side = line(out, "all_reduce >= 16 MiB: busbw auto_sym / inplace limit (timed side by side)")
    assert "min 0.60 (target >= 0.5)" in side_by_side
    assert "min 0.40" in line(out, "all_reduce >= 16 MiB: busbw auto_sym / inplace limit (timed apart)")


def test_one_copy_verdict_compares_with_a_copy_of_one_piece():
    n = 4
    rows = [point("all_gather", "sym_inplace", 64 * MiB, 9.0, n), point("all_gather", "sym_inplace", 256 * MiB, 6.0, n),
            point("memcpy", "memcpy", 16 * MiB, 12.0, n), point("memcpy", "memcpy", 64 * MiB, 10.0, n),
            point("memcpy", "memcpy", 256 * MiB, 1.0, n)]  # the size of the whole output: must not be used
    bw = {(r["op"], r["impl"], r["nbytes"]): r["busbw_GBps"] for r in rows}
    (text,) = one_copy_verdict(rows, bw)
    assert text.endswith("64 MiB 0.75, 256 MiB 0.60")
    assert one_copy_verdict(rows[:2], {k: v for k, v in bw.items() if k[0] != "memcpy"}) == []


def test_in_place_all_gather_against_mpich_and_latency():
    rows = [point("all_gather", "sym_inplace", 32 * MiB, 9.0), point("all_gather", "mpi4py", 32 * MiB, 5.0),
            point("all_gather", "mpi4py_inplace", 32 * MiB, 10.0),
            point("all_reduce", "mpi", 4096, 1.0), point("all_reduce", "mpi4py", 4096, 2.5)]
    out = verdicts(rows)
    assert "min 1.80 (target >= 2)" in line(out, "all_gather >= 16 MiB: busbw sym_inplace / mpi4py ")
    assert "min 0.90" in line(out, "all_gather >= 16 MiB: busbw sym_inplace / mpi4py_inplace")
    assert "2.50 (target <= 2)" in line(out, "all_reduce 4 KiB latency")


# (not the id "mpi": pytest-mpi would take it for its marker and skip the case)
@pytest.mark.parametrize("missing", ["mpi", "ring"], ids=["no-mpi-point", "no-ring-point"])
def test_auto_verdicts_need_both_algorithms(missing):
    rows = [point("all_reduce", impl, 4 * MiB, bw) for impl, bw in (("auto", 6.0), ("mpi", 5.0), ("ring", 4.0))]
    full = verdicts(rows)
    assert "min 1.20 (target >= 0.95)" in line(full, "all_reduce >= 1 MiB: busbw auto / best(mpi, ring)")
    assert not [s for s in verdicts([r for r in rows if r["impl"] != missing]) if "best(mpi, ring)" in s]


def test_single_mode_rows_have_their_own_verdict():
    """Loop verdicts read loop rows only (rows without a mode are loop rows); single calls get
    their own latency line: each mpipar implementation's time over mpi4py's at the smallest size."""
    rows = [dict(point("all_reduce", "mpi", 4096, 0.4), mode="loop"), dict(point("all_reduce", "mpi4py", 4096, 0.8)),
            dict(point("all_reduce", "mpi", 4096, 0.1), mode="single"),
            dict(point("all_reduce", "auto", 4096, 0.2), mode="single"),
            dict(point("all_reduce", "mpi4py", 4096, 0.4), mode="single"),
            dict(point("all_reduce", "mpi4py", 8192, 0.4), mode="single")]
    out = verdicts(rows)
    assert "mpi / raw mpi4py 2.00 (target <= 2)" in line(out, "all_reduce 4 KiB latency")
    single = line(out, "all_reduce 4 KiB single call")
    assert "mpi 4.00, auto 2.00 (target <= 2)" in single
    assert not [s for s in out if "8 KiB" in s]
