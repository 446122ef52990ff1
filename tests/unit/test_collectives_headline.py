"""The collectives recipe's headline says why mpipar's all-reduce is below raw MPI, when it is."""
from __future__ import annotations

import pandas as pd

from mpipar.analysis.recipes import collectives


def _frame(auto: float, mpi4py: float, sym: float | None = None, single: float | None = None) -> pd.DataFrame:
    rows = [{"op": "all_reduce", "impl": "auto", "nbytes": 4 << 20, "busbw_GBps": auto, "mode": "loop"},
            {"op": "all_reduce", "impl": "mpi4py", "nbytes": 4 << 20, "busbw_GBps": mpi4py, "mode": "loop"}]
    if sym is not None:
        rows.append({"op": "all_reduce", "impl": "auto_sym", "nbytes": 4 << 20, "busbw_GBps": sym, "mode": "loop"})
    if single is not None:  # a single-call point of auto: not what the headline reads
        rows.append({"op": "all_reduce", "impl": "auto", "nbytes": 4 << 20, "busbw_GBps": single, "mode": "single"})
    df = pd.DataFrame(rows)
    return df.assign(world_size=4, time_s=(4 << 20) / df["busbw_GBps"] / 1e9, dtype="float32")


def test_below_raw_mpi_the_headline_explains_with_the_symmetric_figure(tmp_path):
    [row] = collectives(_frame(2.0, 4.0, sym=8.0, single=100.0), tmp_path).headlines
    assert row["baseline"] == "mpi4py" and abs(row["ratio"] - 0.5) < 1e-12  # the loop points only
    assert "below raw MPI" in row["headline"] and "auto_sym) gets 2.00x" in row["headline"]


def test_at_or_above_raw_mpi_the_headline_is_plain(tmp_path):
    [row] = collectives(_frame(4.0, 4.0, sym=8.0), tmp_path).headlines
    assert row["headline"] == "all_reduce busbw, mpipar auto, 4 MiB" and row["ratio"] == 1.0
