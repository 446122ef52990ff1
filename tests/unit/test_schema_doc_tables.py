"""results/README.md documents every /results/<name> table the experiment drivers write.

Each driver (collectives, tensor_parallel, pipeline, sequence_parallel,
train_gpt, and train_gpt again with the study's Llama model) runs once in its
quick mode as a subprocess under `.venv/bin/mpiexec` (2 ranks; train_gpt's
`--layouts all` needs 4). Then, for
every table the drivers wrote:

- every column in the file is documented under the table's `/results/<name>`
  heading, and every documented column is in the file (the `point_key`,
  `config`, `written_utc` columns of ResultsWriter tables may instead be left to
  the common `/results/<name>` section);
- the `unit` column of the doc equals the table's `units` attribute;
- every per-table section in the README belongs to a table some driver writes.

tests/unit/test_analysis.py already checks the root attributes, /spans,
/memory and the documented -> present direction of /results/collectives; this
file adds the present -> documented direction and the units for collectives,
and both directions for every other driver's tables. /results/collectives_fit
is documented in prose (no column table) and is left out.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "results" / "README.md"
MPIEXEC = ROOT / ".venv" / "bin" / "mpiexec"
COMMON = ("point_key", "config", "written_utc")  # added by ResultsWriter to every appended table
PROSE = {"collectives_fit"}  # documented in prose, not as a column table

# driver -> (ranks, extra arguments): the smallest runs that write every table of the driver
DRIVERS = {
    "collectives": (2, ["--sizes", "4K,8K", "--ops", "all_reduce", "--impls", "ring,auto,memcpy",
                        "--iters", "1", "--warmup", "0"]),
    "tensor_parallel": (2, ["--quick"]),
    "pipeline": (2, ["--quick"]),
    "sequence_parallel": (2, ["--quick"]),
    # --quick's batch 8 needs dp x microbatches to divide it: 2 microbatches at dp 4
    "train_gpt": (4, ["--quick", "--layouts", "all", "--steps", "2", "--microbatches", "2"]),
    # <script>[<what>]: the same script again; here the study's Llama run (`make run`'s llama driver)
    "train_gpt[llama]": (4, ["--quick", "--layouts", "all", "--steps", "2", "--microbatches", "2",
                             "--arch", "llama", "--model", "llama-tiny"]),
    "llama_peer": (2, ["--quick"]),
    "zero": (2, ["--quick", "--sweep", "--steps", "1", "--warmup", "0", "--variants", "zero0,zero3"]),
}
TABLES = {  # table -> the driver that writes it
    "collectives": "collectives",
    "tensor_parallel": "tensor_parallel",
    "pipeline": "pipeline",
    "sequence_parallel": "sequence_parallel",
    "sequence_parallel_budget": "sequence_parallel",
    "context_parallel": "sequence_parallel",
    "train_gpt": "train_gpt",
    "train_gpt_layouts": "train_gpt",
    "llama_peer": "llama_peer",
    "zero_benchmark": "zero",
    "zero_memory": "zero",
}

pytestmark = pytest.mark.skipif(not README.exists() or not MPIEXEC.exists(),
                                reason="needs results/README.md and the venv's mpiexec")


def documented_tables(text: str) -> dict[str, dict[str, str]]:
    """'/results/<name>' section -> {column: documented unit} from the markdown tables under it.

    A section starts at a heading whose first word is `/results/<name>`; a row's
    first cell may name several backticked columns that share the row's unit.
    """
    out: dict[str, dict[str, str]] = {}
    section, unit_col = None, None
    for line in text.splitlines():
        if line.startswith("#"):
            words = line.lstrip("#").replace(":", " ").split()
            section = words[0] if words and words[0].startswith("/results/") else None
            if section:
                out.setdefault(section, {})
            unit_col = None
            continue
        if section is None or not line.startswith("|") or re.match(r"^\|[\s:|-]+$", line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "column":  # the header row: where the unit is
            unit_col = cells.index("unit") if "unit" in cells else None
            continue
        unit = cells[unit_col] if unit_col is not None and unit_col < len(cells) else ""
        for name in re.findall(r"`([^`]+)`", cells[0]):
            if re.fullmatch(r"[A-Za-z_]\w*", name):
                out[section][name] = unit
    return out


@pytest.fixture(scope="module")
def doc() -> dict[str, dict[str, str]]:
    return documented_tables(README.read_text())


@pytest.fixture(scope="module")
def run_driver(tmp_path_factory):
    """driver -> its HDF5 file; each driver runs at most once per module (timings printed with -s)."""
    cache: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("schema_doc")

    def run(driver: str) -> Path:
        if driver not in cache:
            ranks, args = DRIVERS[driver]
            out = folder / f"{driver.replace('[', '_').rstrip(']')}.h5"
            cmd = ["timeout", "200", str(MPIEXEC), "-n", str(ranks), sys.executable,
                   str(ROOT / "experiments" / f"{driver.partition('[')[0]}.py"), "--out", str(out), *args]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
            print(f"{driver}: {time.perf_counter() - t0:.1f} s at {ranks} ranks")
            assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            cache[driver] = out
        return cache[driver]

    return run


def read_table(path: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """(columns, units) of /results/<name> in path."""
    import h5py

    with h5py.File(path, "r") as f:
        assert f"results/{name}" in f, f"{path.name} has no /results/{name}"
        t = f[f"results/{name}"]
        return json.loads(t.attrs["columns"]), json.loads(t.attrs.get("units", "{}"))


def test_parser_reads_sections_units_and_shared_rows():
    text = ("#### /results/demo (experiments/demo.py)\n\n| column | kind | unit | meaning |\n|---|---|---|---|\n"
            "| `a` | config | B | the `b` in prose is not a column |\n| `c`, `d` | metric | s | two |\n"
            "\n## Other\n\n| column | unit |\n|---|---|\n| `z` | s |\n")
    assert documented_tables(text) == {"/results/demo": {"a": "B", "c": "s", "d": "s"}}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("table", sorted(TABLES))
def test_table_columns_and_units_match_the_doc(table, doc, run_driver):
    path = run_driver(TABLES[table])
    columns, units = read_table(path, table)
    section = f"/results/{table}"
    assert section in doc, f"results/README.md has no section headed {section}"
    documented = doc[section]
    common_ok = "point_key" in columns and not any(c in documented for c in COMMON)
    undocumented = [c for c in columns if c not in documented and not (common_ok and c in COMMON)]
    assert not undocumented, f"{section}: columns in the file but not in results/README.md: {undocumented}"
    missing = [c for c in documented if c not in columns]
    assert not missing, f"{section}: documented columns the driver does not write: {missing}"
    wrong = {c: (documented[c], units.get(c, "")) for c in documented if documented[c] != units.get(c, "")}
    assert not wrong, f"{section}: documented unit != units attribute (doc, file): {wrong}"


@pytest.mark.timeout(300)
def test_every_table_has_a_section_and_every_section_a_table(doc, run_driver):
    import h5py

    written = set()
    for driver in DRIVERS:
        with h5py.File(run_driver(driver), "r") as f:
            written |= set(f["results"])
    assert written - PROSE == set(TABLES), f"tables written by the drivers: {sorted(written)}"
    sections = {s.removeprefix("/results/") for s in doc} - {"<name>"} - PROSE
    assert sections == set(TABLES), f"sections without a table: {sections - set(TABLES)}; " \
                                    f"tables without a section: {set(TABLES) - sections}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("table", ["train_gpt", "train_gpt_layouts"])
def test_llama_run_writes_the_documented_columns_with_its_arch(table, run_driver):
    """The study's Llama run writes the same columns and units as the GPT-2 run (so the doc checked
    above covers it), its config column `arch` says llama, and the GPT-2 run's says gpt2."""
    import h5py

    gpt, llama = run_driver("train_gpt"), run_driver("train_gpt[llama]")
    assert read_table(llama, table) == read_table(gpt, table)
    for path, arch in ((gpt, "gpt2"), (llama, "llama")):
        with h5py.File(path, "r") as f:
            values = {v.decode() if isinstance(v, bytes) else str(v) for v in f[f"results/{table}/arch"][()]}
        assert values == {arch}, (path.name, values)
