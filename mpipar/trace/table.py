"""Column tables in HDF5: one group per table, one resizable 1-D dataset per column.

A table group (`/spans`, `/memory`, `/results/<name>`) holds one dataset per
column, all of the same length (one element per row). Group attributes:
`columns` (JSON list: the column order), `units` (JSON dict column -> unit),
`nrows`. Each column dataset also carries its own `units` attribute when it
has one. Column types: int64, float64, bool, and UTF-8 variable-length
strings. A row missing a column gets the fill value (NaN, -1, False, "").
"""
from __future__ import annotations

import json

import numpy as np

from ..errors import MpiparError

FILL = {"f": np.nan, "i": -1, "b": False, "S": ""}
_RANK = {"b": 0, "i": 1, "f": 2}  # numeric promotion order


def _kind_of(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "b"
    if isinstance(value, (int, np.integer)):
        return "i"
    if isinstance(value, (float, np.floating)):
        return "f"
    if isinstance(value, str):
        return "S"
    raise MpiparError(f"table: unsupported value {value!r} of type {type(value).__name__} "
                      "(use int, float, bool or str; encode the rest as JSON)")


def _merge(a: str | None, b: str | None, column: str) -> str | None:
    if a is None or a == b:
        return b if a is None else a
    if b is None:
        return a
    if "S" in (a, b):
        raise MpiparError(f"table: column {column!r} mixes strings and numbers")
    return a if _RANK[a] >= _RANK[b] else b


def _dataset_kind(ds) -> str:
    if ds.dtype.kind in ("O", "S", "U"):
        return "S"
    return ds.dtype.kind if ds.dtype.kind in "bf" else "i"


def _h5_dtype(kind: str):
    import h5py

    return {"f": np.float64, "i": np.int64, "b": np.bool_, "S": h5py.string_dtype("utf-8")}[kind]


def _as_array(values: list, kind: str) -> np.ndarray:
    filled = [FILL[kind] if v is None else v for v in values]
    if kind == "S":
        return np.array(filled, dtype=object)
    return np.asarray(filled, dtype=_h5_dtype(kind))


def _create(group, name: str, kind: str, nrows: int, unit: str | None):
    ds = group.create_dataset(name, shape=(nrows,), maxshape=(None,), chunks=(128,), dtype=_h5_dtype(kind))
    if nrows:
        ds[:] = _as_array([None] * nrows, kind)
    if unit:
        ds.attrs["units"] = unit
    return ds


def _promote(group, name: str, kind: str):
    old = group[name]
    data, attrs = old[()], dict(old.attrs)
    del group[name]
    ds = group.create_dataset(name, data=data.astype(_h5_dtype(kind)), maxshape=(None,), chunks=(128,))
    for k, v in attrs.items():
        ds.attrs[k] = v
    return ds


def _meta(group, key: str, default):
    return json.loads(group.attrs[key]) if key in group.attrs else default


def append_rows(parent, name: str, rows: list[dict], units: dict | None = None, schema: dict | None = None):
    """Append `rows` (dicts column -> scalar) to table `name` under `parent` (created if missing).

    schema: column -> kind ("i", "f", "b", "S") of columns that must exist even
    when no row has them yet (e.g. the fixed columns of an empty table).
    """
    group = parent.require_group(name)
    columns = _meta(group, "columns", [])
    schema = schema or {}
    columns += [c for c in schema if c not in columns]
    all_units = {**_meta(group, "units", {}), **(units or {})}
    nrows = int(group.attrs.get("nrows", 0))
    for row in rows:
        columns += [c for c in row if c not in columns]
    for col in columns:
        kind = schema.get(col)
        for row in rows:
            kind = _merge(kind, _kind_of(row.get(col)), col)
        if col in group:
            have = _dataset_kind(group[col])
            new = _merge(have, kind, col)
            ds = _promote(group, col, new) if new != have else group[col]
        else:
            new = kind or "f"
            ds = _create(group, col, new, nrows, all_units.get(col))
        if all_units.get(col) and "units" not in ds.attrs:
            ds.attrs["units"] = all_units[col]
        ds.resize((nrows + len(rows),))
        if rows:
            ds[nrows:] = _as_array([row.get(col) for row in rows], new)
    group.attrs["columns"] = json.dumps(columns)
    group.attrs["units"] = json.dumps({c: u for c, u in all_units.items() if u})
    group.attrs["nrows"] = nrows + len(rows)
    return group


def write_rows(parent, name: str, rows: list[dict], units: dict | None = None, schema: dict | None = None):
    """Replace table `name` under `parent` by exactly `rows`."""
    if name in parent:
        del parent[name]
    return append_rows(parent, name, rows, units, schema)


def read_table(group) -> dict[str, np.ndarray]:
    """Columns of a table group as numpy arrays (strings decoded to str objects), in order."""
    columns = _meta(group, "columns", None) or [k for k in group if hasattr(group[k], "dtype")]
    out = {}
    for col in columns:
        ds = group[col]
        out[col] = ds.asstr()[()] if _dataset_kind(ds) == "S" else ds[()]
    return out


def read_rows(group) -> list[dict]:
    """A table group as a list of row dicts of Python scalars (for rewriting a table)."""
    cols = {c: v.tolist() for c, v in read_table(group).items()}
    n = int(group.attrs.get("nrows", len(next(iter(cols.values()), []))))
    return [{c: v[i] for c, v in cols.items()} for i in range(n)]


def table_units(group) -> dict:
    """Column -> unit of a table group."""
    return _meta(group, "units", {})
