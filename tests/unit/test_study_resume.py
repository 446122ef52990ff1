"""experiments/study.py: a study killed with SIGTERM midway and resumed loses and repeats no point.

The study runs a tiny sweep driver (written here; it resumes through
mpipar.trace.ResultsWriter like the real drivers) under `mpiexec -n 2`. We
SIGTERM either the study itself or its mpiexec once a few points are stored,
then `--resume` the same folder and check every point is stored exactly once
with the right value. Also: a new run makes a new folder, `--dry-run` lists
points and runs nothing, a driver that cannot resume has its partial file
moved aside, the flags given to a driver follow its --help, and the default
plan trains the Llama model beside GPT-2 (its own driver and file).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "experiments" / "study.py"
MPIEXEC = ROOT / ".venv" / "bin" / "mpiexec"
POINTS = 6

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="needs the venv's mpiexec (make install)")

DRIVER = textwrap.dedent('''
    """Tiny sweep for the study tests. Resumes: completed points are skipped."""
    import argparse, time
    from mpi4py import MPI
    from mpipar.flight.abort import install_abort_on_exception
    from mpipar.trace import ResultsWriter, completed_points, point_key
    install_abort_on_exception()
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    points = [{"i": i, "size": 2 ** i, "ranks": comm.size} for i in range(args.points)]
    done = comm.bcast(completed_points(args.out, "sweep") if comm.rank == 0 else None)
    if args.dry_run:
        for cfg in points:
            if comm.rank == 0:
                print("point", "done" if point_key(cfg) in done else "todo", point_key(cfg))
        raise SystemExit(0)
    attrs = {"command": "fake sweep", "world_size": comm.size}
    w = ResultsWriter(args.out, "sweep", units={"total": "1"}, attrs=attrs) if comm.rank == 0 else None
    for cfg in points:
        if point_key(cfg) in done:
            continue
        total = comm.allreduce(cfg["size"])
        time.sleep(args.sleep)
        if comm.rank == 0:
            w.append(cfg, {"total": total})
            print("stored", cfg["i"], flush=True)
        comm.Barrier()
''')


def _plan(tmp_path: Path, sleep: float = 0.5) -> Path:
    driver = tmp_path / "fake_sweep.py"
    driver.write_text(DRIVER)
    plan = {"study": "resume-test", "drivers": [
        {"name": "sweep", "script": str(driver), "out": "sweep.h5", "timeout_s": 240,
         "args": {"--points": POINTS, "--sleep": sleep}, "quick_args": {"--points": 3, "--sleep": 0.0}}]}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def _study(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(STUDY), "--np", "2", "--mpiexec", str(MPIEXEC), "--results",
            str(tmp_path / "results"), "--config", str(_plan(tmp_path)), "--silent", *args]


def _rows(path: Path) -> list[int]:
    try:
        with h5py.File(path, "r") as f:
            return [int(i) for i in f["results/sweep/i"][()]]
    except (OSError, KeyError):
        return []


def _study_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "results" / "resume-test").glob("*T*Z*"))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _import_study():
    sys.path.insert(0, str(STUDY.parent))
    try:
        import study
    finally:
        sys.path.pop(0)
    return study


def _kill_midway(cmd: list[str], tmp_path: Path, target: str, min_points: int = 2) -> tuple[Path, int]:
    """Start the study, SIGTERM `target` ("study" or "mpiexec") once min_points are stored."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    folder = None
    while time.time() < deadline:
        dirs = _study_dirs(tmp_path)
        folder = dirs[-1] if dirs else None
        if folder and len(_rows(folder / "sweep.h5")) >= min_points:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the sweep never stored its first points")
    if target == "study":
        proc.send_signal(signal.SIGTERM)
    else:
        (mpiexec,) = [p for p in _children(proc.pid) if "mpiexec" in Path(f"/proc/{p}/cmdline").read_text()]
        os.kill(mpiexec, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert len(_rows(folder / "sweep.h5")) < POINTS, f"killed too late to test anything:\n{out}"
    return folder, proc.returncode


def _check_complete(folder: Path, analysed: bool) -> None:
    rows = _rows(folder / "sweep.h5")
    assert sorted(rows) == list(range(POINTS)), f"points lost or repeated: {rows}"
    with h5py.File(folder / "sweep.h5", "r") as f:
        keys = f["results/sweep/point_key"].asstr()[()].tolist()
        totals = f["results/sweep/total"][()].tolist()
        assert len(set(keys)) == len(keys) == POINTS
        assert totals == [2 * 2 ** i for i in rows], "a point holds a wrong value"
    manifest = json.loads((folder / "study.json").read_text())
    assert manifest["drivers"]["sweep"]["status"] == "ok"
    assert manifest["drivers"]["sweep"]["points"] == POINTS
    assert (folder / "sweep.csv").exists() == analysed and (folder / "summary.csv").exists() == analysed


@pytest.mark.timeout(400)
@pytest.mark.parametrize("target", ["study", "mpiexec"])
def test_sigterm_midway_then_resume_loses_and_repeats_nothing(tmp_path, target):
    extra = ["--no-analysis"] if target == "mpiexec" else []  # the analysis is checked once
    folder, rc = _kill_midway(_study(tmp_path, *extra), tmp_path, target)
    manifest = json.loads((folder / "study.json").read_text())
    expected = {"study": ("interrupted", 143), "mpiexec": ("failed", 1)}[target]
    assert (manifest["drivers"]["sweep"]["status"], rc) == expected
    before = _rows(folder / "sweep.h5")
    res = subprocess.run(_study(tmp_path, "--resume", str(folder), *extra), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    _check_complete(folder, analysed=not extra)
    assert _rows(folder / "sweep.h5")[: len(before)] == before, "resume rewrote stored points"
    assert _study_dirs(tmp_path) == [folder], "resume must not create a new study folder"
    assert manifest["drivers"]["sweep"]["runs"] == 1
    assert json.loads((folder / "study.json").read_text())["drivers"]["sweep"]["runs"] == 2


@pytest.mark.timeout(300)
def test_new_run_new_folder_and_dry_run_lists_points(tmp_path):
    res = subprocess.run(_study(tmp_path, "--quick"), capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Summary" in res.stdout
    res = subprocess.run(_study(tmp_path, "--quick", "--no-analysis"), capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stdout + res.stderr
    first, second = _study_dirs(tmp_path)
    assert sorted(_rows(first / "sweep.h5")) == sorted(_rows(second / "sweep.h5")) == [0, 1, 2]
    res = subprocess.run(_study(tmp_path, "--dry-run"), capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("point todo") == POINTS
    assert len(_study_dirs(tmp_path)) == 2, "--dry-run must not create a study folder"
    res = subprocess.run(_study(tmp_path, "--dry-run", "--resume", str(first)), capture_output=True,
                         text=True, timeout=200)
    assert res.stdout.count("point done") == 3 and res.stdout.count("point todo") == 0, res.stdout


def test_driver_without_resume_support_has_its_partial_file_moved_aside(tmp_path):
    study = _import_study()
    out = tmp_path / "x.h5"
    out.write_bytes(b"partial")
    entry: dict = {}
    study.prepare_resume(out, "done = completed_points(args.out, 'sweep')", entry)
    study.prepare_resume(out, "if writer.done(conf): continue", entry)
    assert out.exists() and not entry, "a ResultsWriter driver resumes on its own file"
    study.prepare_resume(out, "write_table(cfg.out, 'train', rows)", entry)
    assert not out.exists() and len(entry["moved_aside"]) == 1
    assert (tmp_path / entry["moved_aside"][0]).read_bytes() == b"partial"
    assert not entry["moved_aside"][0].endswith(".h5"), "the analysis would load the partial file"


def test_driver_flags_follow_the_drivers_help(tmp_path):
    study = _import_study()
    d = study.Driver("x", "experiments/x.py", "x.h5", {"--sizes": "4K,1M", "--quick": True, "--nope": 3})
    argv, dropped = study.driver_argv(d, False, "usage: x.py [-h] [--out OUT] [--sizes S] [--quick]",
                                      tmp_path / "x.h5", {})
    assert argv == ["experiments/x.py", "--out", str(tmp_path / "x.h5"), "--sizes", "4K,1M", "--quick"]
    assert dropped == ["--nope"]


@pytest.mark.timeout(300)
def test_damaged_results_file_moved_aside_on_resume_and_dir_resumes(tmp_path):
    folder = tmp_path / "results" / "job-17"
    res = subprocess.run(_study(tmp_path, "--quick", "--no-analysis", "--dir", str(folder)), capture_output=True,
                         text=True, timeout=200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(_rows(folder / "sweep.h5")) == [0, 1, 2]
    data = (folder / "sweep.h5").read_bytes()
    (folder / "sweep.h5").write_bytes(data[: len(data) // 2])  # a file cut short
    (folder / "notes.h5").write_bytes(b"kept")  # not the study's: never touched
    res = subprocess.run(_study(tmp_path, "--no-analysis", "--dir", str(folder)), capture_output=True, text=True,
                         timeout=200)  # --dir of an existing study resumes it (its recorded --quick plan)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sweep.h5 is damaged" in res.stderr and "moved aside" in res.stderr
    manifest = json.loads((folder / "study.json").read_text())
    (aside,) = manifest["drivers"]["sweep"]["moved_aside"]
    assert (folder / aside).read_bytes() == data[: len(data) // 2]  # the damaged bytes are kept, aside
    assert sorted(_rows(folder / "sweep.h5")) == [0, 1, 2] and manifest["drivers"]["sweep"]["runs"] == 2
    assert (folder / "notes.h5").read_bytes() == b"kept" and _study_dirs(tmp_path) == []


def test_checkpointing_driver_gets_save_and_resume(tmp_path):
    study = _import_study()
    d = study.Driver("gpt", "experiments/train_gpt.py", "train_gpt.h5")
    helps = "usage: [--out OUT] [--save SAVE] [--resume RESUME]"
    assert study.checkpoint_flags(d, tmp_path, "usage: [--out OUT]") == {}
    assert study.checkpoint_flags(d, tmp_path, helps) == {"--save": str(tmp_path / "gpt.ckpt")}
    (tmp_path / "gpt.ckpt" / "dp1-pp1-sp1-tp4" / "step-000003").mkdir(parents=True)
    assert "--resume" not in study.checkpoint_flags(d, tmp_path, helps)  # a half save is no checkpoint
    (tmp_path / "gpt.ckpt" / "dp1-pp1-sp1-tp4" / "step-000003" / "manifest.json").write_text("{}")
    assert study.checkpoint_flags(d, tmp_path, helps)["--resume"] == str(tmp_path / "gpt.ckpt")


def test_default_plan_trains_llama_beside_gpt2_into_its_own_file(tmp_path):
    study = _import_study()
    from _study_plan import default_plan  # importable once study is (experiments/ on sys.path)

    plan = {d.name: d for d in default_plan(4)}
    gpt, llama = plan["gpt"], plan["llama"]
    assert llama.script == gpt.script == "experiments/train_gpt.py" and llama.out != gpt.out
    assert llama.args["--layouts"] == gpt.args["--layouts"] == "all"  # the same 8 layouts, side by side
    for flags in (llama.args, llama.quick_args):
        assert (flags["--arch"], flags["--model"]) == ("llama", "llama-tiny")
    assert "--arch" not in gpt.args and "--model" not in gpt.args  # gpt stays the default GPT-2 model
    assert [d.name for d in study.select(list(plan.values()), ["train_llama"])] == ["llama"]
    help_text = study.Runner(4, [str(MPIEXEC)]).help_text(llama.script)
    for quick in (False, True):
        argv, dropped = study.driver_argv(llama, quick, help_text, tmp_path / llama.out, {})
        assert dropped == [] and argv[argv.index("--arch") + 1] == "llama", argv


def test_resume_takes_the_launcher_given_now(tmp_path):
    """A requeued batch job resumes its study with this allocation's launcher (a PBS job's
    hostfile is a new file after the requeue): --mpiexec given with --resume replaces the
    recorded one; without it the recorded one stays."""
    folder = tmp_path / "results" / "resume-test" / "20261206T000000Z"
    folder.mkdir(parents=True)
    plan = json.loads(_plan(tmp_path).read_text())
    manifest = {"study": "resume-test", "np": 2, "mpiexec": "false -hostfile /gone/nodefile", "np_flag": "-n",
                "quick": False, "plan": plan["drivers"], "drivers": {"sweep": {"status": "pending", "out": "sweep.h5"}}}
    (folder / "study.json").write_text(json.dumps(manifest))
    base = [sys.executable, str(STUDY), "--dry-run", "--resume", str(folder)]
    res = subprocess.run([*base, "--mpiexec", "true"], capture_output=True, text=True, timeout=200)
    assert res.returncode == 0 and "== sweep: true -n 2 python" in res.stdout, res.stdout + res.stderr
    res = subprocess.run(base, capture_output=True, text=True, timeout=200)
    assert "== sweep: false -hostfile /gone/nodefile -n 2 python" in res.stdout, res.stdout + res.stderr


def test_study_calibrates_this_host_once(tmp_path, monkeypatch):
    """A study that trains measures this host for mpipar.plan when it has no calibration (its
    predictions would use another host's), not when one is kept, not for --quick, and not with
    another launcher (the calibration starts the venv's mpiexec)."""
    study = _import_study()
    from mpipar.plan import host

    monkeypatch.setattr(host, "CACHE_DIR", tmp_path / "cache")
    ran = []
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or
                        type("R", (), {"returncode": 0})())
    gpt = study.Driver("gpt", "experiments/train_gpt.py", "train_gpt.h5")
    other = study.Driver("x", "experiments/collectives.py", "x.h5")
    local = str(study.ROOT / ".venv/bin/mpiexec")

    def manifest(**kw):
        return {"np": 4, "quick": False, "mpiexec": local, **kw}

    study.calibrate_host([other], tmp_path, manifest(), 10)
    study.calibrate_host([gpt], tmp_path, manifest(quick=True), 10)
    study.calibrate_host([gpt], tmp_path, manifest(mpiexec="srun --mpi=pmi2"), 10)
    assert ran == []
    monkeypatch.chdir(study.ROOT)  # `make run` passes the launcher relative to the repository
    assert study.launches_locally(".venv/bin/mpiexec") and study.launches_locally(f"{local} -launcher fork")
    assert not study.launches_locally("mpiexec") and not study.launches_locally("srun --mpi=pmi2")
    m = manifest()
    study.calibrate_host([gpt], tmp_path, m, 10)
    assert len(ran) == 1 and ran[0][2:5] == ["mpipar.plan", "calibrate", "--ranks"] and ran[0][5] == "2,4"
    assert m["calibration"]["status"] == "ok"
    host.cache_path().parent.mkdir(parents=True)
    host.cache_path().write_text("{}")
    m = manifest()
    study.calibrate_host([gpt], tmp_path, m, 10)
    assert len(ran) == 1 and m["calibration"]["status"] == "kept earlier"
