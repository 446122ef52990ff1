"""Tracer: timed spans and memory samples of every rank, saved to one HDF5 file.

    tracer = Tracer(mesh)                      # collective: barrier, then t0
    with tracer.span("forward", microbatch=i, stage=s):
        ...
    with tracer.activations:                   # count tensors saved for backward
        loss = model(x)
    tracer.sample_memory("after forward")
    tracer.save("results/run.h5", attrs={"schedule": "1f1b"})   # collective; rank 0 writes

Every span also carries `cpu_s`, the CPU seconds this process used inside it:
less than the wall time where the rank waited or shared its core with others.
`tracer.memory_enabled = False` keeps the spans, records no memory sample, and
tells a PipelineRunner not to sample or hook the activation meter: both cost
time inside and between the spans (a /proc read per sample, a Python hook per
saved tensor), which a bubble measured from the spans would count.

Times are seconds since t0, a moment every rank takes right after a barrier
at construction, so spans of different ranks share one time base (to within
the barrier's exit skew; within one node the clock is the same monotonic
clock). `rank` is the rank in the traced group (the world rank for a Mesh);
`stage` defaults to the pipeline coordinate of a Mesh, else -1;
`microbatch` defaults to -1. Every row also carries `run`, the id of the
tracer that recorded it, so a resumed sweep saving into the same file keeps
the spans of the earlier runs (root attribute `runs`: run id -> t0 in Unix time).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

from ..agree import agree
from ..flight.recorder import recorded
from ..mesh import Mesh, as_group
from . import h5
from .memory import ActivationMeter, device_bytes, rss_bytes
from .table import read_rows, write_rows

SPAN_SCHEMA = {"run": "S", "rank": "i", "name": "S", "stage": "i", "microbatch": "i", "t_start": "f", "t_end": "f",
               "cpu_s": "f"}
MEMORY_SCHEMA = {"run": "S", "rank": "i", "label": "S", "t": "f", "rss_bytes": "i", "activation_bytes": "i",
                 "device_bytes": "i", "activation_peak_bytes": "i", "device_peak_bytes": "i"}
UNITS = {"t_start": "s", "t_end": "s", "cpu_s": "s", "t": "s", "rss_bytes": "B", "activation_bytes": "B",
         "device_bytes": "B", "activation_peak_bytes": "B", "device_peak_bytes": "B"}


class Tracer:
    """Records spans and memory samples on each rank of a group; `save` writes them all.

    Construction is collective over the group (one barrier). `device`: where
    CUDA bytes are read (default: the Mesh's device; none for a bare group).
    `enabled=False` makes spans and samples no-ops (save still writes the file).
    """

    def __init__(self, mesh_or_group, device=None, enabled: bool = True):
        self.source = mesh_or_group
        self.group = as_group(mesh_or_group)
        self.rank = self.group.rank
        self.device = device if device is not None else getattr(mesh_or_group, "device", None)
        self.default_stage = mesh_or_group.coords["pp"] if isinstance(mesh_or_group, Mesh) else -1
        self.enabled = enabled
        self.memory_enabled = True
        self.activations = ActivationMeter()
        self.spans: list[dict] = []
        self.memory: list[dict] = []
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        run = f"{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}" if self.rank == 0 else None
        self.run = recorded(self.group, "tracer", self.group.comm.bcast, run, root=0)
        recorded(self.group, "tracer", self.group.comm.Barrier)
        self.t0 = time.perf_counter()
        self.t0_unix = self.group.comm.bcast(time.time(), root=0)

    def now(self) -> float:
        """Seconds since this tracer's t0."""
        return time.perf_counter() - self.t0

    def record(self, name: str, t_start: float, t_end: float, stage=None, microbatch=None, **fields) -> None:
        """Add a span measured elsewhere (times in seconds since t0, e.g. from `now()`)."""
        if not self.enabled:
            return
        self.spans.append({"run": self.run, "rank": self.rank, "name": str(name),
                           "stage": self.default_stage if stage is None else int(stage),
                           "microbatch": -1 if microbatch is None else int(microbatch),
                           "t_start": float(t_start), "t_end": float(t_end), **fields})

    @contextlib.contextmanager
    def span(self, name: str, stage=None, microbatch=None, **fields):
        """Time the body; recorded even if it raises. Extra fields become extra /spans columns."""
        if not self.enabled:
            yield self
            return
        start, cpu = self.now(), time.process_time()
        try:
            yield self
        finally:
            self.record(name, start, self.now(), stage=stage, microbatch=microbatch,
                        cpu_s=time.process_time() - cpu, **fields)

    def sample_memory(self, label: str, **fields) -> dict:
        """Record RSS, live/peak autograd-saved bytes (self.activations) and CUDA bytes now."""
        dev, dev_peak = device_bytes(self.device)
        row = {"run": self.run, "rank": self.rank, "label": str(label), "t": self.now(), "rss_bytes": rss_bytes(),
               "activation_bytes": int(self.activations.current),
               "activation_peak_bytes": int(self.activations.peak),
               "device_bytes": dev, "device_peak_bytes": dev_peak, **fields}
        if self.enabled and self.memory_enabled:
            self.memory.append(row)
        return row

    def clear(self) -> None:
        """Forget the records taken so far (the time base stays)."""
        self.spans.clear()
        self.memory.clear()

    def save(self, path, attrs: dict | None = None) -> str:
        """Collective: gather every rank's records; rank 0 writes /spans and /memory to `path`.

        An existing file is updated: its /results tables, first provenance and
        the rows of other runs are kept; this tracer's earlier rows are
        replaced (saving twice never duplicates). Root attributes:
        `provenance(mesh_or_group)`, `runs` (JSON run id -> t0_unix), `attrs`.
        Raises MpiparError on every rank if rank 0 could not write.
        """
        comm = self.group.comm
        prov = h5.provenance(self.source)
        if not self.memory:   # every file carries /memory: at least the rank's state when it was saved
            self.sample_memory("at save")
        spans = recorded(self.group, "tracer save", comm.gather, self.spans, root=0)
        memory = recorded(self.group, "tracer save", comm.gather, self.memory, root=0)
        error = None
        if self.rank == 0:
            try:
                self._write(path, prov, [r for rows in spans for r in rows],
                            [r for rows in memory for r in rows], attrs)
            except Exception as exc:  # reported on every rank below
                error = f"Tracer.save({path!r}) failed on rank 0: {type(exc).__name__}: {exc}"
        agree(comm, error)
        return str(path)

    def _write(self, path, prov: dict, spans: list, memory: list, attrs: dict | None) -> None:
        with h5.atomic_h5(path) as f:
            h5.set_attrs(f, prov, overwrite=False)
            runs = json.loads(f.attrs["runs"]) if "runs" in f.attrs else {}
            f.attrs["runs"] = json.dumps({**runs, self.run: self.t0_unix})
            h5.set_attrs(f, attrs)
            for name, rows, schema in (("spans", spans, SPAN_SCHEMA), ("memory", memory, MEMORY_SCHEMA)):
                old = [r for r in read_rows(f[name]) if r.get("run") != self.run] if name in f else []
                write_rows(f, name, old + rows, UNITS, schema)
