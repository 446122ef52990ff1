"""Resumable, crash-safe experiment tables under /results/<name> of an HDF5 file.

One point of a sweep = one row: its config (the columns that define the point)
and its measurements. Each `append` lands on disk atomically before it
returns (copy, append, fsync, rename: see `h5.atomic_h5`), so a sweep killed
at any moment leaves a readable file holding every completed point. A
restarted sweep asks `completed_points(path, name)` which point keys are done
and skips them:

    done = completed_points(path, "collectives")
    w = ResultsWriter(path, "collectives", units={"time_s": "s"}, attrs=provenance(mesh))
    for cfg in sweep:
        if point_key(cfg) in done:
            continue
        w.append(cfg, measure(cfg))

Not collective: call it on one rank (rank 0) only.
"""
from __future__ import annotations

import json
import os

from ..errors import require
from . import h5
from .table import append_rows, read_table, write_rows

KEY = "point_key"
CONFIG = "config"
WRITTEN = "written_utc"
RESERVED = (KEY, CONFIG, WRITTEN)


def point_key(config: dict) -> str:
    """Stable identity of a point: canonical JSON of its config (sorted keys, no spaces)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)


def completed_points(path, name: str) -> set[str]:
    """Point keys already stored in /results/<name> of `path` (empty if there is no such file/table)."""
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        return set()
    with h5py.File(path, "r") as f:
        group = f.get(f"results/{name}")
        if group is None or KEY not in group:
            return set()
        return set(group[KEY].asstr()[()].tolist())


def read_results(path, name: str) -> dict:
    """Columns of /results/<name> as numpy arrays ({} if the table does not exist)."""
    import h5py

    with h5py.File(os.fspath(path), "r") as f:
        group = f.get(f"results/{name}")
        return read_table(group) if group is not None else {}


def write_table(path, name: str, rows: list[dict], units: dict | None = None,
                attrs: dict | None = None, root_attrs: dict | None = None) -> None:
    """Atomically replace /results/<name> of `path` by `rows` (for derived tables: fits, summaries)."""
    with h5.atomic_h5(path) as f:
        h5.set_attrs(f, root_attrs, overwrite=False)
        group = write_rows(f.require_group("results"), name, rows, units)
        h5.set_attrs(group, attrs)


class ResultsWriter:
    """Appends points to /results/<name> of `path`, each one durable when `append` returns.

    units: column -> unit string (stored as the table's `units` attribute and
    on each column). attrs: root attributes (e.g. `provenance(mesh)`) written
    where missing, so a resumed sweep keeps its first run's provenance; the
    resumed run's time and command are appended to the `resumed` attribute.
    table_attrs: attributes of the table group (e.g. a description).
    """

    def __init__(self, path, name: str, units: dict | None = None, attrs: dict | None = None,
                 table_attrs: dict | None = None, durable: bool = True):
        require(isinstance(name, str) and name and "/" not in name,
                f"ResultsWriter: table name must be a non-empty string without '/', got {name!r}")
        self.path, self.name, self.durable = os.fspath(path), name, durable
        self.units = dict(units or {})
        h5.remove_stale_temps(self.path)
        existed = os.path.exists(self.path)
        self.keys = completed_points(self.path, name)
        with h5.atomic_h5(self.path, durable) as f:
            if existed and attrs:
                self._note_resume(f, attrs)
            h5.set_attrs(f, attrs, overwrite=False)
            group = append_rows(f.require_group("results"), name, [], self.units)
            h5.set_attrs(group, table_attrs)

    @staticmethod
    def _note_resume(f, attrs: dict) -> None:
        runs = json.loads(f.attrs["resumed"]) if "resumed" in f.attrs else []
        runs.append({"utc": attrs.get("created_utc", h5.utc_now()), "command": attrs.get("command", "")})
        f.attrs["resumed"] = json.dumps(runs)

    def done(self, config: dict) -> bool:
        """True if the point with this config is already in the table."""
        return point_key(config) in self.keys

    def row(self, config: dict, metrics: dict) -> dict:
        """The row stored for a point: config columns, metric columns, key, config JSON, time."""
        clash = sorted(set(config) & set(metrics) | (set(config) | set(metrics)) & set(RESERVED))
        require(not clash, f"ResultsWriter: column names used twice or reserved: {clash}")
        return {**config, **metrics, KEY: point_key(config),
                CONFIG: json.dumps(config, sort_keys=True, default=str), WRITTEN: h5.utc_now()}

    def append(self, config: dict, metrics: dict, units: dict | None = None) -> str:
        """Store one point durably; returns its key. A point already stored raises MpiparError."""
        row = self.row(config, metrics)
        key = row[KEY]
        require(key not in self.keys, f"ResultsWriter: point {key} is already in {self.path}:/results/{self.name}")
        self.units.update(units or {})
        with h5.atomic_h5(self.path, self.durable) as f:
            append_rows(f.require_group("results"), self.name, [row], self.units)
        self.keys.add(key)
        return key

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"ResultsWriter({self.path!r}, {self.name!r}, points={len(self.keys)})"

