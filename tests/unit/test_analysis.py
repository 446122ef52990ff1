"""mpipar.analysis on synthetic HDF5 files written with mpipar.trace's writer.

Loading (rows, config and provenance columns, units, several files), the
metrics against closed-form numbers (strong/weak scaling, alpha-beta fit,
bubble error, fraction of a limit), the report (CSV, PNG, summary), the
`python -m mpipar.analysis` entry point, `h5dump -H` on the files, and the
schema documented in results/README.md against a file produced by the writer.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mpipar import MpiparError, analysis
from mpipar.comm import bus_factor, cost
from mpipar.trace import PROVENANCE_KEYS, ResultsWriter, atomic_h5
from mpipar.trace.table import write_rows

ROOT = Path(__file__).resolve().parents[2]
ALPHA, BETA = 20e-6, 1 / 2e9  # 20 us per step, 2 GB/s


def _attrs(world_size: int, command: str = "synthetic") -> dict:
    attrs = {k: f"test-{k}" for k in PROVENANCE_KEYS}
    mesh = json.dumps({"tp": world_size, "sp": 1, "dp": 1, "pp": 1})
    attrs.update(world_size=world_size, command=command, mesh=mesh,
                 hostnames=json.dumps(["h"] * world_size), created_utc="2025-01-01T00:00:00+00:00")
    return attrs


def _collectives_file(path: Path, world_size: int) -> None:
    w = ResultsWriter(path, "collectives", units={"time_s": "s", "busbw_GBps": "GB/s", "nbytes": "B"},
                      attrs=_attrs(world_size))
    for impl in ("auto", "mpi4py"):
        for nbytes in (4096, 65536, 1 << 20, 8 << 20):
            t = cost("all_reduce", nbytes, world_size, ALPHA, BETA) * (1.0 if impl == "mpi4py" else 0.8)
            busbw = nbytes / t * bus_factor("all_reduce", world_size) / 1e9
            w.append({"op": "all_reduce", "impl": impl, "nbytes": nbytes, "world_size": world_size},
                     {"time_s": t, "busbw_GBps": busbw, "memcpy_GBps": 10.0, "wrong": 0})


def _spans_file(path: Path) -> None:
    rows = [{"rank": r, "name": op, "stage": r, "microbatch": m, "t_start": 0.1 * m + r, "t_end": 0.1 * m + r + 0.05}
            for r in range(2) for m in range(3) for op in ("F", "B")]
    with atomic_h5(path) as f:
        for k, v in _attrs(2).items():
            f.attrs[k] = v
        write_rows(f, "spans", rows, {"t_start": "s", "t_end": "s"})


@pytest.fixture
def study(tmp_path):
    for n in (2, 4):
        _collectives_file(tmp_path / f"collectives_{n}.h5", n)
    _spans_file(tmp_path / "pipeline_trace.h5")
    return tmp_path


def test_load_gives_one_row_per_point_with_config_provenance_and_units(study):
    tables = analysis.load([study])
    df = tables["collectives"]
    assert len(df) == 2 * 2 * 4
    for col in ("op", "impl", "nbytes", "world_size", "time_s", "point_key", "config", "file", *PROVENANCE_KEYS):
        assert col in df.columns, col
    assert df.attrs["units"]["busbw_GBps"] == "GB/s"
    assert sorted(df["world_size"].unique().tolist()) == [2, 4]
    assert df["point_key"].is_unique
    assert (df["command"] == "synthetic").all() and df["nbytes"].dtype.kind == "i"
    spans = analysis.load_spans([study])
    assert len(spans) == 12 and set(spans["name"]) == {"F", "B"}
    assert analysis.load_memory([study]).empty


def test_load_rejects_missing_paths(tmp_path):
    with pytest.raises(MpiparError):
        analysis.load([tmp_path / "nope.h5"])


def test_strong_and_weak_scaling_against_closed_form():
    df = pd.DataFrame({"n": [1, 2, 4, 1, 2, 4], "t": [8.0, 4.0, 4.0, 6.0, 6.0, 12.0], "case": list("aaabbb")})
    strong = analysis.scaling(df, "n", "t", by=["case"]).set_index(["case", "n"])
    assert strong.loc[("a", 2), "speedup"] == pytest.approx(2.0)
    assert strong.loc[("a", 4), "efficiency"] == pytest.approx(0.5)
    assert strong.loc[("b", 4), "speedup"] == pytest.approx(0.5)
    weak = analysis.scaling(df, "n", "t", by=["case"], kind="weak").set_index(["case", "n"])
    assert weak.loc[("b", 2), "efficiency"] == pytest.approx(1.0)
    assert weak.loc[("b", 4), "efficiency"] == pytest.approx(0.5)
    assert weak.loc[("b", 4), "speedup"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        analysis.scaling(df, "n", "t", kind="sideways")


def test_alpha_beta_fit_recovers_the_model(study):
    df = analysis.load([study])["collectives"]
    fits = analysis.fit_alpha_beta(df[df["impl"] == "mpi4py"], by=("impl",))
    assert len(fits) == 2  # world sizes 2 and 4
    for _, row in fits.iterrows():
        assert row["alpha_s"] == pytest.approx(ALPHA, rel=1e-6)
        assert row["beta_s_per_byte"] == pytest.approx(BETA, rel=1e-6)
        assert row["bandwidth_GBps"] == pytest.approx(2.0, rel=1e-6)
        assert row["rel_rms"] < 1e-9


def test_bubble_error_fraction_of_limit_and_ratio():
    df = pd.DataFrame({"bubble_measured": [0.30, 0.10], "bubble_simulated": [0.25, 0.10],
                       "busbw": [5.0, 2.0], "memcpy": [10.0, 10.0], "impl": ["mpipar", "serial"], "k": [1, 1]})
    assert analysis.bubble_error(df)["bubble_error"].tolist() == pytest.approx([0.05, 0.0])
    assert analysis.vs_limit(df, "busbw", "memcpy", "frac")["frac"].tolist() == pytest.approx([0.5, 0.2])
    r = analysis.ratio_to(df, "busbw", df["impl"] == "serial", by=["k"])
    assert r["busbw_vs_baseline"].tolist() == pytest.approx([2.5, 1.0])


def test_zero_memory_headlines_hold_each_stage_to_what_it_keeps(tmp_path):
    """The ZeRO sweep's headline: measured bytes per parameter over mpipar's form of that stage at
    the widest dp (1.0x: no copy too many), the paper's closed form named beside it."""
    from mpipar.analysis.recipes import zero_memory

    df = pd.DataFrame([{"dp": d, "zero": z, "model_state_per_param": mine + (0.5 if (z, d) == (1, 4) else 0.0),
                        "closed_form_per_param": paper, "mpipar_form_per_param": mine}
                       for d in (2, 4) for z, paper, mine in ((0, 16.0, 8.0), (1, 4 + 12 / d, 4 + 16 / d))])
    got = {h["headline"]: h["ratio"] for h in zero_memory(df, tmp_path).headlines}
    assert got == {"zero=0 model state per parameter, dp=4 (ZeRO paper: 16)": 1.0,
                   "zero=1 model state per parameter, dp=4 (ZeRO paper: 7)": pytest.approx(8.5 / 8.0)}


def test_analyze_writes_csv_figures_and_summary(study, tmp_path):
    out = tmp_path / "out"
    report = analysis.analyze([study], out)
    assert not report["errors"], report["errors"]
    assert (out / "collectives.csv").exists() and (out / "summary.csv").exists()
    back = pd.read_csv(out / "collectives.csv")
    assert len(back) == 16 and "world_size" in back.columns
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in map(Path, report["figures"]))
    text = analysis.format_summary(report["summary"])
    assert "Summary" in text


def test_headline_is_the_ratio_to_the_baseline_of_the_same_run(study, tmp_path):
    summary = analysis.analyze([study], tmp_path / "out")["summary"]
    rows = summary[summary["experiment"] == "collectives"]
    assert rows["baseline"].tolist() == ["mpi4py"]  # no gloo and no memcpy points in these files
    assert rows["ratio"].iloc[0] == pytest.approx(1 / 0.8)  # auto is 0.8x the time of mpi4py


def test_sequence_weak_scaling_per_unit_of_work_is_one_for_perfect_scaling():
    from mpipar.analysis.recipes import _weak_sequence

    c = 1e-7  # perfect: time = c * seq^2 / sp (causal attention work over sp ranks)
    rows = [("serial", 1, 512)] + [(m, n, 512 * n) for m in ("ring-zigzag", "ulysses") for n in (2, 4)]
    df = pd.DataFrame([{"method": m, "sp": n, "seq": q, "time_s": c * q * q / n} for m, n, q in rows])
    weak = _weak_sequence(df)
    assert len(weak) == 6 and set(weak["method"]) == {"ring-zigzag", "ulysses"}
    assert weak["work_efficiency"].tolist() == pytest.approx([1.0] * 6)
    assert weak.loc[weak["sp"] == 4, "efficiency"].tolist() == pytest.approx([0.25, 0.25])


LAYOUTS = ["dp1-pp1-sp1-tp4", "dp1-pp4-sp1-tp1", "dp4-pp1-sp1-tp1", "dp2-pp1-sp1-tp2"]


def _train_file(path: Path, arch: str | None, speed: float, loss0: float) -> None:
    """A train_gpt.py-shaped file of one model: /results/train_gpt (3 steps per layout) and
    /results/train_gpt_layouts; tokens/s of layout i is speed * (i + 1), loss falls from loss0.
    arch None: a file from before the `arch` column."""
    from mpipar.trace import write_table

    steps, layouts = [], []
    for i, name in enumerate(LAYOUTS):
        dp, pp, sp, tp = (int(x[2:]) for x in name.split("-"))
        mesh = {"layout": name, **({"arch": arch} if arch else {}), "dp": dp, "pp": pp, "sp": sp, "tp": tp}
        steps += [{**mesh, "step": k, "loss": loss0 - 0.25 * k, "tokens_per_s": speed * (i + 1)} for k in range(3)]
        layouts.append({**mesh, "tokens_per_s": speed * (i + 1), "step_s": 1.0 / (speed * (i + 1)),
                        "pred_step_s": 1.5 / (speed * (i + 1))})
    write_table(path, "train_gpt", steps, {"tokens_per_s": "tokens/s"}, root_attrs=_attrs(4))
    write_table(path, "train_gpt_layouts", layouts, {"tokens_per_s": "tokens/s"})


@pytest.fixture
def two_models(tmp_path):
    """The files of the study's gpt and llama drivers: one table name, two models."""
    folder = tmp_path / "study"
    folder.mkdir()
    _train_file(folder / "train_gpt.h5", "gpt2", speed=100.0, loss0=4.0)
    _train_file(folder / "train_llama.h5", "llama", speed=1000.0, loss0=5.0)  # every figure 10x / other
    return folder


def test_train_gpt_tables_are_analysed_per_model_never_mixed(two_models, tmp_path):
    out = tmp_path / "out"
    report = analysis.analyze([two_models], out)
    assert not report["errors"], report["errors"]
    assert [a for a, _ in analysis.by_arch(report["tables"]["train_gpt_layouts"])] == ["gpt2", "llama"]
    s = report["summary"].set_index("headline")
    # each model's fastest layout against its own data-parallel layout: llama's 10x rows never leak into gpt2's
    gpt = s.loc["gpt2 tokens/s, fastest layout dp2-pp1-sp1-tp2"]
    assert gpt["experiment"] == "train_gpt_layouts" and gpt["value"] == 400.0 and gpt["baseline_value"] == 300.0
    llama = s.loc["llama tokens/s, fastest layout dp2-pp1-sp1-tp2"]
    assert llama["experiment"] == "train_gpt_layouts[llama]" and llama["value"] == 4000.0
    assert llama["baseline_value"] == 3000.0
    assert s.loc["gpt2 step time prediction, mean |predicted / measured - 1|", "value"] == pytest.approx(0.5)
    loss = s.loc["gpt2 loss after step 2, dp1-pp1-sp1-tp4"]
    assert (loss["value"], loss["baseline_value"]) == (3.5, 4.0)
    loss = s.loc["llama loss after step 2, dp1-pp1-sp1-tp4"]
    assert (loss["value"], loss["baseline_value"], loss["experiment"]) == (4.5, 5.0, "train_gpt[llama]")
    side = pd.read_csv(out / "train_gpt_layouts_by_arch.csv").set_index("layout")  # side by side
    assert side.loc[LAYOUTS, "gpt2"].tolist() == [100.0, 200.0, 300.0, 400.0]
    assert side.loc[LAYOUTS, "llama"].tolist() == [1000.0, 2000.0, 3000.0, 4000.0]
    for name in ("train_gpt_layouts", "train_gpt_loss", "train_gpt_loss_llama", "train_gpt_predicted_llama"):
        assert (out / f"{name}.png").stat().st_size > 1000, name


def test_summary_status_of_each_model_is_its_own_driver(two_models, tmp_path):
    summary = analysis.analyze([two_models], tmp_path / "out")["summary"]
    manifest = {"drivers": {"gpt": {"status": "ok"}, "llama": {"status": "timeout"}}}
    lines = analysis.format_summary(summary, manifest).splitlines()
    assert all(" timeout " in ln for ln in lines if ln.startswith("train_gpt_layouts[llama]"))
    assert all(" ok " in ln for ln in lines if ln.startswith("train_gpt_layouts "))
    gpt_only = summary[~summary["experiment"].str.contains("llama")]
    text = analysis.format_summary(gpt_only, {"drivers": {"gpt": {"status": "ok"}, "llama": {"status": "failed"}}})
    assert re.search(r"^llama +failed +\(no results\)", text, re.M), text


def test_tables_without_an_arch_column_are_gpt2(tmp_path):
    _train_file(tmp_path / "old.h5", None, speed=100.0, loss0=4.0)
    summary = analysis.analyze([tmp_path / "old.h5"], tmp_path / "out")["summary"]
    assert set(summary["experiment"]) == {"train_gpt", "train_gpt_layouts"}
    assert "gpt2 tokens/s, fastest layout dp2-pp1-sp1-tp2" in summary["headline"].tolist()


def test_module_entry_point(study, tmp_path):
    res = subprocess.run([sys.executable, "-m", "mpipar.analysis", str(study), "--out", str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "collectives: 16 points" in res.stdout
    assert (tmp_path / "cli" / "collectives.csv").exists()


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian hdf5-tools) not installed")
def test_h5dump_reads_every_file(study):
    for path in sorted(study.glob("*.h5")):
        res = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "GROUP" in res.stdout and "world_size" in res.stdout


# ---- results/README.md (the schema doc) against files the writer produces ---------------------

README = ROOT / "results" / "README.md"
MPIEXEC = ROOT / ".venv" / "bin" / "mpiexec"
WRITER = """
import sys
from mpi4py import MPI
import mpipar
from mpipar.trace import ResultsWriter, Tracer, provenance
mesh = mpipar.Mesh(comm=MPI.COMM_WORLD)
tracer = Tracer(mesh)
with tracer.activations:
    with tracer.span("F", microbatch=0):
        tracer.sample_memory("after F")
prov = provenance(mesh)
if mesh.world.rank == 0:
    ResultsWriter(sys.argv[1], "demo", {"time_s": "s"}, prov).append({"n": 1}, {"time_s": 0.5})
tracer.save(sys.argv[1], attrs={"driver": "test"})
"""


def documented_fields(text: str) -> dict[str, list[str]]:
    """Section heading -> the backticked names in the first column of its markdown tables."""
    out: dict[str, list[str]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not re.match(r"^\|[\s:-]+\|", line):
            names = re.findall(r"`([^`]+)`", line.split("|")[1])
            out.setdefault(heading, []).extend(n for n in names if re.fullmatch(r"[A-Za-z_]\w*", n))
    return out


def _section(fields: dict, start: str) -> list[str]:
    (key,) = [k for k in fields if k.startswith(start)]
    assert fields[key], f"no documented fields under '{key}'"
    return fields[key]


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.timeout(600)
@pytest.mark.skipif(not README.exists() or not MPIEXEC.exists(), reason="needs results/README.md and the venv")
def test_schema_doc_matches_the_files_the_writer_produces(tmp_path):
    import h5py

    fields = documented_fields(README.read_text())
    path = tmp_path / "writer.h5"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    _run(["timeout", "200", str(MPIEXEC), "-n", "2", sys.executable, str(script), str(path)])
    files = {"writer": path}
    driver = ROOT / "experiments" / "collectives.py"
    if driver.exists():
        files["collectives"] = tmp_path / "collectives.h5"
        _run(["timeout", "200", str(MPIEXEC), "-n", "2", sys.executable, str(driver), "--out",
              str(files["collectives"]), "--sizes", "4K,8K", "--ops", "all_reduce", "--impls", "ring,auto,memcpy",
              "--iters", "1", "--warmup", "0"])
    for name, h5 in files.items():
        with h5py.File(h5, "r") as f:
            missing = [a for a in _section(fields, "Root attributes") if a not in f.attrs]
            assert not missing, f"{name}: documented root attributes missing: {missing}"
            for table in ("spans", "memory"):
                missing = [c for c in _section(fields, f"/{table}") if c not in f[table]]
                assert not missing, f"{name}: documented /{table} columns missing: {missing}"
            tables = [f["spans"], f["memory"], *f["results"].values()]
            for t in tables:
                missing = [a for a in _section(fields, "Tables") if a not in t.attrs]
                assert not missing, f"{name}: table {t.name} lacks documented attributes {missing}"
            for t in f["results"].values():
                if "point_key" in t:  # appended by ResultsWriter (derived tables are written whole)
                    missing = [c for c in _section(fields, "/results/<name>") if c not in t]
                    assert not missing, f"{name}: {t.name} lacks documented columns {missing}"
            if name == "collectives":
                missing = [c for c in _section(fields, "/results/collectives (") if c not in f["results/collectives"]]
                assert not missing, f"documented /results/collectives columns missing: {missing}"
        if shutil.which("h5dump"):
            res = subprocess.run(["h5dump", "-H", str(h5)], capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
        assert analysis.load([h5]), "pandas could not load the results tables"
