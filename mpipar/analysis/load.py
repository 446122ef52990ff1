"""Load mpipar HDF5 files into pandas: one row per point, config and provenance as columns.

    tables = load(["results/scaling/20250101T000000Z"])   # files or folders
    tables["collectives"]           # DataFrame: one row per measured point
    tables["collectives"].attrs["units"]    # column -> unit

Each `/results/<name>` table of every file becomes rows of `tables[name]`
(tables of the same name in several files are concatenated). Columns: the
table's own columns (a point's config keys are columns already; the `config`
column keeps the JSON), then every root attribute of the file (provenance:
`world_size`, `mpi_library`, `git_commit`, ...; named `attr_<key>` when the
table has a column of that name), then `file`. `load_spans` and `load_memory`
read the `/spans` and `/memory` tables the same way. Tables of the same name
from runs of different models (train_gpt's `arch` column: gpt2, llama) are
concatenated too; `by_arch` splits them again, and the recipes analyse each
model on its own. The schema is documented
in results/README.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import MpiparError


def h5_files(paths) -> list[Path]:
    """The .h5 files named by `paths` (files, or folders searched recursively), sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.h5") if not q.name.startswith("."))
        elif p.is_file():
            found.append(p)
        else:
            raise MpiparError(f"analysis: no such file or folder: {p}")
    return found


def _plain(value):
    """An HDF5 attribute value as a plain Python scalar or string."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def provenance(path) -> dict:
    """Root attributes of an HDF5 file as plain Python values."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: _plain(v) for k, v in f.attrs.items()}


def _columns(group) -> tuple[dict, dict]:
    """(column -> array, column -> unit) of a column-table group or a compound dataset."""
    import h5py

    from ..trace.table import read_table, table_units

    if isinstance(group, h5py.Dataset):  # a structured (compound) table
        data = group[()]
        cols = {n: data[n] for n in (data.dtype.names or ())}
        cols = {k: np.char.decode(v, "utf-8") if v.dtype.kind == "S" else v for k, v in cols.items()}
        units = json.loads(group.attrs.get("units", "{}"))
        return cols, units
    return read_table(group), table_units(group)


def _frame(group, attrs: dict, path: Path) -> pd.DataFrame:
    cols, units = _columns(group)
    df = pd.DataFrame({k: pd.Series(v) for k, v in cols.items()})
    for key, value in attrs.items():
        df["attr_" + key if key in df.columns else key] = value
    df["file"] = str(path)
    df.attrs["units"] = dict(units)
    return df


def load_file(path) -> dict[str, pd.DataFrame]:
    """The `/results/<name>` tables of one file, keyed by name."""
    import h5py

    path = Path(path)
    attrs = provenance(path)
    with h5py.File(path, "r") as f:
        results = f.get("results")
        if results is None:
            return {}
        return {name: _frame(results[name], attrs, path) for name in results}


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f.columns)]
    if not frames:
        return pd.DataFrame()
    units: dict = {}
    for f in frames:
        units.update(f.attrs.get("units", {}))
    out = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0].copy()
    out.attrs["units"] = units
    return out


def load(paths) -> dict[str, pd.DataFrame]:
    """Every `/results/<name>` table of every file under `paths`, one DataFrame per name."""
    by_name: dict[str, list[pd.DataFrame]] = {}
    for path in h5_files(paths):
        for name, df in load_file(path).items():
            by_name.setdefault(name, []).append(df)
    return {name: _concat(frames) for name, frames in sorted(by_name.items())}


DEFAULT_ARCH = "gpt2"  # rows of files written before the `arch` column existed


def by_arch(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """[(arch, rows of that model)] of a table, gpt2 first then by name; a table without an
    `arch` column (or rows with none) counts as gpt2. Each part keeps the table's units."""
    arch = df["arch"].fillna(DEFAULT_ARCH).astype(str) if "arch" in df.columns else pd.Series(
        DEFAULT_ARCH, index=df.index)
    parts = []
    for name in sorted(arch.unique(), key=lambda a: (a != DEFAULT_ARCH, a)):
        part = df[(arch == name).to_numpy()].copy()
        part.attrs["units"] = dict(df.attrs.get("units", {}))
        parts.append((name, part))
    return parts


def _load_top(paths, table: str) -> pd.DataFrame:
    import h5py

    frames = []
    for path in h5_files(paths):
        with h5py.File(path, "r") as f:
            if table in f:
                frames.append(_frame(f[table], provenance(path), path))
    return _concat(frames)


def load_spans(paths) -> pd.DataFrame:
    """The `/spans` tables (rank, name, stage, microbatch, t_start, t_end, ...) of all files."""
    return _load_top(paths, "spans")


def load_memory(paths) -> pd.DataFrame:
    """The `/memory` tables (rank, label, t, rss_bytes, activation_bytes, device_bytes) of all files."""
    return _load_top(paths, "memory")
