"""mpipar.trace under MPI: spans of every rank on one time base, provenance, memory, activation meter."""
import datetime
import json
import os
import shutil
import tempfile
import time

import h5py
import pytest
import torch
from mpi4py import MPI

import mpipar
from mpipar import trace

pytestmark = pytest.mark.mpi
COMM = MPI.COMM_WORLD


@pytest.fixture
def shared_dir():
    """A temp directory made by rank 0, known to every rank, removed after the test."""
    d = COMM.bcast(tempfile.mkdtemp(prefix="mpipar-trace-") if COMM.rank == 0 else None, root=0)
    yield d
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(d, ignore_errors=True)


def _read(path, table):
    with h5py.File(path, "r") as f:
        return trace.read_table(f[table]), dict(f.attrs)


def test_spans_of_all_ranks_share_a_time_base(shared_dir):
    mesh = mpipar.Mesh(comm=COMM)
    time.sleep(0.2 * COMM.rank)  # ranks build the tracer at different times
    tracer = trace.Tracer(mesh)
    COMM.Barrier()
    with tracer.span("after_barrier", microbatch=COMM.rank, stage=COMM.size - COMM.rank, step=7):
        pass
    with tracer.span("work"):
        time.sleep(0.01)
    path = os.path.join(shared_dir, "spans.h5")
    tracer.save(path, attrs={"note": "test", "extra": {"k": [1, 2]}})
    spans, attrs = _read(path, "spans")
    n = COMM.size
    assert sorted(spans["rank"].tolist()) == sorted(list(range(n)) * 2)
    first = spans["name"] == "after_barrier"
    assert sorted(spans["microbatch"][first].tolist()) == list(range(n))
    by_rank = dict(zip(spans["rank"][first].tolist(), spans["stage"][first].tolist()))
    assert by_rank == {r: n - r for r in range(n)}
    assert (spans["step"][first] == 7).all() and (spans["step"][~first] == -1).all()
    assert (spans["stage"][~first] == 0).all() and (spans["microbatch"][~first] == -1).all()
    assert (spans["t_end"] >= spans["t_start"]).all()
    work = spans["name"] == "work"
    assert ((spans["t_end"] - spans["t_start"])[work] >= 0.009).all()
    # without the barrier at construction, rank r's clock would start 0.2*r s late
    starts = spans["t_start"][first]
    assert starts.max() - starts.min() < 0.1
    assert attrs["note"] == "test" and json.loads(attrs["extra"]) == {"k": [1, 2]}


def test_runs_saved_into_one_file_keep_each_others_rows(shared_dir):
    path = os.path.join(shared_dir, "runs.h5")
    first, second = trace.Tracer(COMM), trace.Tracer(COMM)
    assert first.run != second.run
    with first.span("a"):
        pass
    first.save(path)
    with second.span("b"):
        pass
    second.save(path)
    with second.span("c"):
        pass
    second.save(path)  # replaces the second run's rows, keeps the first run's
    spans, attrs = _read(path, "spans")
    runs = {first.run: ["a"], second.run: ["b", "c"]}
    for run, names in runs.items():
        mine = spans["run"] == run
        assert sorted(spans["name"][mine].tolist()) == sorted(names * COMM.size)
    assert sorted(json.loads(attrs["runs"])) == sorted(runs)


def test_a_file_without_samples_still_has_memory_rows(shared_dir):
    path = os.path.join(shared_dir, "nomem.h5")
    tracer = trace.Tracer(COMM)
    with tracer.span("a"):
        pass
    tracer.save(path)
    memory, _ = _read(path, "memory")
    assert sorted(memory["rank"].tolist()) == list(range(COMM.size))
    assert (memory["rss_bytes"] > 0).all()


def test_provenance_attributes(shared_dir):
    mesh = mpipar.Mesh(comm=COMM)
    path = os.path.join(shared_dir, "prov.h5")
    trace.Tracer(mesh).save(path)
    _, attrs = _read(path, "spans")
    for key in trace.PROVENANCE_KEYS:
        assert key in attrs, key
    assert attrs["world_size"] == COMM.size
    assert json.loads(attrs["mesh"]) == {"tp": 1, "sp": 1, "dp": COMM.size, "pp": 1}
    assert len(json.loads(attrs["hostnames"])) == COMM.size
    assert attrs["mpi_library"] == MPI.Get_library_version().strip().strip("\x00").strip()
    assert attrs["torch_version"] == str(torch.__version__)
    assert attrs["mpipar_version"] == mpipar.__version__
    assert datetime.datetime.fromisoformat(attrs["created_utc"]).utcoffset() == datetime.timedelta(0)
    assert "pytest" in attrs["command"]
    assert len(attrs["git_commit"]) == 40 or attrs["git_commit"] == "unknown"
    prov = trace.provenance(COMM)  # a bare communicator works too, same on every rank
    assert COMM.allgather(prov["created_utc"]) == [prov["created_utc"]] * COMM.size


def test_a_disabled_meter_counts_nothing_and_enabled_again_counts():
    meter = trace.ActivationMeter()
    w = torch.nn.Parameter(torch.randn(256))
    x = torch.randn(64, 256)
    meter.enabled = False
    with meter:
        y = (x * w).exp().sum()
    assert meter.current == 0 and meter.peak == 0
    y.backward()
    meter.enabled = True
    with meter:
        y = (x * w).exp().sum()
    assert meter.current == 2 * x.nbytes and meter.peak == 2 * x.nbytes
    y.backward()
    assert meter.current == 0


def test_memory_samples_and_save_keeps_results_tables(shared_dir):
    tracer = trace.Tracer(COMM)
    path = os.path.join(shared_dir, "mem.h5")
    if COMM.rank == 0:
        trace.ResultsWriter(path, "points").append({"p": 1}, {"v": 2.0})
    w = torch.nn.Parameter(torch.randn(256))
    x = torch.randn(64, 256)
    with tracer.activations:
        y = (x * w).exp().sum()
    tracer.sample_memory("forward", step=1)
    y.backward()
    tracer.sample_memory("backward")
    tracer.save(path)
    tracer.save(path)  # saving again replaces the records, never duplicates them
    mem, attrs = _read(path, "memory")
    assert sorted(mem["rank"].tolist()) == sorted(list(range(COMM.size)) * 2)
    assert (mem["rss_bytes"] > 1 << 20).all()
    fwd = mem["label"] == "forward"
    assert (mem["activation_bytes"][fwd] == 2 * x.nbytes).all()  # x (for w's grad) and exp's output
    assert (mem["activation_bytes"][~fwd] == 0).all()
    assert (mem["activation_peak_bytes"] == 2 * x.nbytes).all()
    assert (mem["device_bytes"] == 0).all() and (mem["step"][fwd] == 1).all()
    with h5py.File(path, "r") as f:
        assert f["results/points/v"][0] == 2.0 and "spans" in f and f["memory/t"].attrs["units"] == "s"
        assert f["memory/rss_bytes"].attrs["units"] == "B"


def test_activation_meter_counts_saved_tensors_and_drops_after_backward():
    lin1, lin2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)
    x = torch.randn(16, 32)
    meter = trace.ActivationMeter()
    with meter:
        h = lin1(x)                 # saves x (the weight is a parameter: skipped)
        g = torch.nn.functional.gelu(h)   # saves h
        out = lin2(g).sum()         # saves g
    assert meter.current == x.nbytes + h.nbytes + g.nbytes
    h2 = lin1(x)                    # outside the meter: not counted
    assert meter.current == x.nbytes + h.nbytes + g.nbytes
    out.backward()
    assert meter.current == 0 and meter.peak == x.nbytes + h.nbytes + g.nbytes
    meter.reset_peak()
    assert meter.peak == 0
    with meter:
        a = x.clone().requires_grad_()
        b = a * a                    # the same tensor saved twice counts once
        c = b[:4].exp()              # exp saves its output
    assert meter.current == a.nbytes + c.nbytes
    del b, c                          # graph freed without backward: bytes released too
    assert meter.current == 0
    meter.exclude(x)
    with meter:
        d = lin2(lin1(x))
    assert meter.current == d.new_empty(16, 64).nbytes  # x excluded; lin1's output saved by lin2
    del d, h2
    assert meter.current == 0
