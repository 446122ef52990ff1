"""ResultsWriter: durable per-point appends, crash safety under SIGKILL, resume without duplicates."""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from mpipar import MpiparError
from mpipar.trace import (ResultsWriter, atomic_h5, completed_points, point_key, read_results, table_units,
                          write_table)

NAME = "sweep"

# A sweep that skips completed points, prints each point's index once it is durable.
# With a third argument k it SIGKILLs itself in the middle of writing point k
# (after the row went into the open HDF5 file, before the file is closed).
CHILD = textwrap.dedent("""
    import os, signal, sys
    from mpipar.trace import ResultsWriter, completed_points, point_key, results
    path, n = sys.argv[1], int(sys.argv[2])
    die_at = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    real_append = results.append_rows
    def append_rows(parent, name, rows, units=None, schema=None):
        group = real_append(parent, name, rows, units, schema)
        if rows and rows[0]["i"] == die_at:
            parent.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return group
    results.append_rows = append_rows
    done = completed_points(path, "sweep")
    w = ResultsWriter(path, "sweep", units={"time_s": "s"}, attrs={"command": "child"})
    for i in range(n):
        cfg = {"i": i, "size_bytes": 4096 * 2 ** (i % 8), "impl": "ring"}
        if point_key(cfg) in done:
            continue
        w.append(cfg, {"time_s": i * 0.5, "note": "x" * 2000})
        print(i, flush=True)
""")


def _config(i):
    return {"i": i, "size_bytes": 4096 * 2 ** (i % 8), "impl": "ring"}


def _run_child(path, n, kill_after=None, die_at=None):
    """Run the sweep; SIGKILL it right after `kill_after` points were reported durable."""
    extra = [] if die_at is None else [str(die_at)]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(n), *extra],
                            stdout=subprocess.PIPE, text=True)
    reported = []
    for line in proc.stdout:
        reported.append(int(line))
        if kill_after is not None and len(reported) >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    rc = proc.wait(timeout=60)
    return reported, rc


def _stored_indices(path):
    with h5py.File(path, "r") as f:  # must open: the file is readable after any kill
        return [int(i) for i in f["results/sweep/i"][()]]


def test_sigkill_mid_sweep_keeps_every_completed_point_and_resume_completes(tmp_path):
    path = tmp_path / "sweep.h5"
    n = 16
    seen = []
    for kill_after in (4, 3):
        reported, rc = _run_child(path, n, kill_after)
        assert rc == -signal.SIGKILL
        seen += reported
        stored = _stored_indices(path)
        assert set(seen) <= set(stored), "a point reported durable was lost"
        assert stored == list(range(len(stored))), "points stored out of order or duplicated"
        # at most the point in flight at the kill may have landed beyond those reported
        assert len(stored) <= len(seen) + 1
    reported, rc = _run_child(path, n, die_at=len(stored) + 2)  # killed inside an HDF5 write
    assert rc == -signal.SIGKILL and len(reported) == 2
    assert _stored_indices(path) == list(range(len(stored) + 2))
    reported, rc = _run_child(path, n)
    assert rc == 0
    stored = _stored_indices(path)
    assert stored == list(range(n))
    keys = read_results(path, NAME)["point_key"].tolist()
    assert len(keys) == len(set(keys)) == n
    assert completed_points(path, NAME) == {point_key(_config(i)) for i in range(n)}
    assert not glob.glob(str(tmp_path / ".*.tmp")), "stale temp files of killed writers were not removed"
    with h5py.File(path, "r") as f:
        assert f.attrs["command"] == "child"
        assert len(json.loads(f.attrs["resumed"])) == 3


def test_roundtrip_types_units_and_config(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultsWriter(path, NAME, units={"time_s": "s", "busbw": "GB/s"}, attrs={"world_size": 2},
                      table_attrs={"description": "test"})
    cfg = {"op": "all_reduce", "size_bytes": 1024, "quick": True}
    key = w.append(cfg, {"time_s": 1.5e-5, "busbw": 3.25, "wrong": 0})
    assert key == point_key(cfg) == point_key(dict(reversed(list(cfg.items()))))
    assert w.done(cfg) and len(w) == 1
    cols = read_results(path, NAME)
    assert cols["op"].tolist() == ["all_reduce"] and cols["size_bytes"].dtype == np.int64
    assert cols["quick"].dtype == np.bool_ and cols["quick"][0]
    assert cols["time_s"][0] == 1.5e-5 and cols["wrong"][0] == 0
    assert json.loads(cols["config"][0]) == cfg
    with h5py.File(path, "r") as f:
        group = f["results/sweep"]
        assert table_units(group) == {"time_s": "s", "busbw": "GB/s"}
        assert group["time_s"].attrs["units"] == "s"
        assert group.attrs["description"] == "test" and f.attrs["world_size"] == 2


def test_new_columns_fill_and_int_promotes_to_float(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultsWriter(path, NAME)
    w.append({"p": 0}, {"a": 1})
    w.append({"p": 1}, {"a": 2.5, "b": "late"})
    cols = read_results(path, NAME)
    assert cols["a"].dtype == np.float64 and cols["a"].tolist() == [1.0, 2.5]
    assert cols["b"].tolist() == ["", "late"]
    w.append({"p": 2}, {"b": "x"})
    assert math.isnan(read_results(path, NAME)["a"][2])


def test_duplicates_and_reserved_names_raise(tmp_path):
    path = tmp_path / "r.h5"
    w = ResultsWriter(path, NAME)
    w.append({"p": 0}, {"a": 1})
    with pytest.raises(MpiparError, match="already"):
        w.append({"p": 0}, {"a": 2})
    with pytest.raises(MpiparError, match="already"):  # a fresh writer (a resumed sweep) knows it too
        ResultsWriter(path, NAME).append({"p": 0}, {"a": 2})
    with pytest.raises(MpiparError, match="twice or reserved"):
        w.append({"p": 1}, {"p": 1})
    with pytest.raises(MpiparError, match="twice or reserved"):
        w.append({"p": 1}, {"point_key": "x"})
    with pytest.raises(MpiparError, match="unsupported"):
        w.append({"p": 1}, {"a": [1, 2]})
    assert read_results(path, NAME)["a"].tolist() == [1]


def test_completed_points_of_missing_file_or_table(tmp_path):
    assert completed_points(tmp_path / "none.h5", NAME) == set()
    ResultsWriter(tmp_path / "r.h5", "other").append({"p": 0}, {})
    assert completed_points(tmp_path / "r.h5", NAME) == set()
    assert completed_points(tmp_path / "r.h5", "other") == {point_key({"p": 0})}


def test_failed_update_leaves_file_untouched(tmp_path):
    path = tmp_path / "r.h5"
    ResultsWriter(path, NAME).append({"p": 0}, {"a": 1})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_h5(path) as f:
            f["results/sweep/a"][0] = 99
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert not glob.glob(str(tmp_path / ".*.tmp"))


def test_write_table_replaces_and_keeps_other_tables(tmp_path):
    path = tmp_path / "r.h5"
    ResultsWriter(path, NAME).append({"p": 0}, {"a": 1})
    write_table(path, "fit", [{"op": "all_reduce", "alpha_s": 1e-6}], units={"alpha_s": "s"})
    write_table(path, "fit", [{"op": "all_gather", "alpha_s": 2e-6}], units={"alpha_s": "s"})
    assert read_results(path, "fit")["op"].tolist() == ["all_gather"]
    assert read_results(path, NAME)["a"].tolist() == [1]
