#!/usr/bin/env python3
"""The scaling study behind `make run`: every experiment driver under mpiexec, then the analysis.

    python experiments/study.py --np 4 --mpiexec .venv/bin/mpiexec [--quick] [--dry-run]
        [--only collectives,tensor,...] [--resume results/scaling/<timestamp>] [--config plan.json]

Creates results/<study>/<UTC timestamp>/ (a new folder every run) and runs each
driver as `<mpiexec> -n NP python <driver> --out <folder>/<name>.h5 <flags>`,
its output teed to <name>.log. A driver that fails or passes its time limit is
recorded as such in study.json and the study goes on. At the end the analysis
(`mpipar.analysis.report`) writes CSV and PNG files next to the .h5 files and
the summary table is printed (also in summary.csv).

Resuming: `--resume DIR` reruns every driver of DIR/study.json not marked
"ok", with the settings recorded there (the launcher too, unless --mpiexec
gives the current allocation's: a requeued PBS job has a new hostfile), into
the same files; the drivers' ResultsWriter skips the points already stored, so
none is lost or repeated. A
driver without resume support has its partial file moved aside first. A
results file that no longer opens (a write cut short by a crash of the disk,
not by a kill: those are atomic) is moved aside as <name>.h5.damaged-<UTC>
with a warning and its driver runs again; every intact file stays. `--dir DIR`
resumes DIR if it holds a study.json and starts a new study there otherwise:
the form a requeued batch job uses (jobs/).
SIGTERM/SIGINT/SIGUSR1 stop the running driver (it finishes the point in hand and
exits 128 + signal: mpipar.models.preempt) and mark it "interrupted"; the study
then exits 128 + signal.
A driver that checkpoints (its --help lists --save and --resume, like
train_gpt.py) saves into <folder>/<name>.ckpt/ when stopped and continues from
there on --resume; the folder is removed once the driver has finished ("ok").

Before the drivers, a study that trains (train_gpt.py puts mpipar.plan's
prediction next to each layout's measurement) calibrates this host once, about
a minute, if this kind of host has no calibration yet (mpipar.plan.host;
--no-calibrate skips it, and the predictions then use the shipped local-cpu).

The plan (drivers, their flags, their time limits) is `default_plan()`, or a
JSON file given with --config: {"study": name, "drivers": [{"name", "script",
"out", "args": {flag: value|true}, "quick_args": {...}, "timeout_s"}, ...]}.
Flags a driver's --help does not list are dropped (and reported).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MPIEXEC = str(ROOT / ".venv/bin/mpiexec")  # make install's launcher (the wheel's MPICH)

from _study_plan import (Driver, count_points, driver_argv, load_plan, prepare_resume,
                         select, utc_stamp)

ANALYSIS_RESERVE_S = 30.0  # kept from the budget for the analysis at the end
MIN_DRIVER_S = 20.0  # do not start a driver with less time than this
CALIBRATE_LIMIT_S = 300.0  # mpipar.plan calibrate, once per kind of host (about 1 min on 2 cores)
GRACE_S = 30.0  # after SIGTERM, the driver's process group gets SIGKILL this much later (time to checkpoint)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: SLURM's --signal=B:USR1@<s>


def new_study_dir(results: Path, study: str) -> Path:
    """results/<study>/<UTC timestamp>[-k]/, created; never an existing folder."""
    base = results / study / utc_stamp()
    path, k = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            k += 1
            path = base.with_name(f"{base.name}-{k}")


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclasses.dataclass
class Runner:
    """Runs drivers as child process groups; forwards SIGTERM/SIGINT to the running one."""

    np: int
    launcher: list[str]
    np_flag: str = "-n"
    child: subprocess.Popen | None = None
    stop_signal: int | None = None
    term_sent: float | None = None
    forward: int = signal.SIGTERM

    def help_text(self, script: str) -> str:
        """The driver's --help (run without mpiexec); '' if it cannot tell."""
        try:
            out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                                 text=True, timeout=120, cwd=ROOT)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout if out.returncode == 0 else ""

    def on_signal(self, signum, _frame) -> None:
        """SIGTERM/SIGINT/SIGUSR1 handler: remember it and pass it on to the running driver
        (SIGUSR1 as itself: srun forwards it without its SIGKILL a few seconds after SIGTERM)."""
        self.stop_signal = signum
        self.forward = signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM
        self.terminate()

    def terminate(self) -> None:
        """Signal the launcher once (mpiexec and srun forward it to the ranks); never blocks."""
        if self.child is not None and self.child.poll() is None and self.term_sent is None:
            self.term_sent = time.time()
            try:
                self.child.send_signal(self.forward)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the driver's whole process group (launcher and ranks)."""
        try:
            os.killpg(self.child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def run(self, argv: list[str], log: Path, timeout: float, echo: bool = True) -> tuple[int, str]:
        """Run `launcher -n NP python argv`; (returncode, status) with status ok|failed|timeout|interrupted.

        Past `timeout` s (or on SIGTERM/SIGINT to the study) the launcher gets
        SIGTERM, and its process group SIGKILL GRACE_S seconds later.
        """
        cmd = [*self.launcher, self.np_flag, str(self.np), sys.executable, *argv]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        deadline, timed_out, self.term_sent = time.time() + timeout, False, None
        with open(log, "a") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                                          env=env, start_new_session=True)
            pump = threading.Thread(target=_tee, args=(self.child.stdout, fh, echo), daemon=True)
            pump.start()
            if self.stop_signal:
                self.terminate()
            while self.child.poll() is None:
                time.sleep(0.2)
                if not timed_out and time.time() > deadline:
                    timed_out = True
                    self.terminate()
                if self.term_sent is not None and time.time() - self.term_sent > GRACE_S:
                    self.kill()
            rc = self.child.wait()
            pump.join(5)
        self.child = None
        status = "interrupted" if self.stop_signal else "timeout" if timed_out else "ok" if rc == 0 else "failed"
        return rc, status


def set_aside_if_damaged(out: Path, entry: dict) -> bool:
    """Move `out` to <name>.damaged-<UTC> (with a warning) if it exists but does not open as HDF5."""
    if not out.exists():
        return False
    try:
        import h5py

        with h5py.File(out, "r") as f:
            f.visititems(lambda _name, obj: dict(obj.attrs))  # every header and attribute readable
        return False
    except Exception as exc:  # noqa: BLE001 - any failure to read means: not intact
        aside = out.with_name(f"{out.name}.damaged-{utc_stamp()}")  # not *.h5: the analysis skips it
        out.rename(aside)
        entry.setdefault("moved_aside", []).append(aside.name)
        print(f"study: warning: {out} is damaged ({type(exc).__name__}: {exc}); moved aside to {aside.name}, "
              "its driver runs again", file=sys.stderr, flush=True)
        return True


def checkpoint_flags(d: Driver, folder: Path, help_text: str) -> dict:
    """--save <folder>/<name>.ckpt for a driver that checkpoints, and --resume when it holds one."""
    if "--save" not in help_text or "--resume" not in help_text:
        return {}
    ckpt = folder / f"{d.name}.ckpt"
    flags = {"--save": str(ckpt)}
    if any(ckpt.glob("step-*/manifest.json")) or any(ckpt.glob("*/step-*/manifest.json")):
        flags["--resume"] = str(ckpt)
    return flags


def _tee(stream, fh, echo: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        fh.write(line)
        fh.flush()
        if echo:
            sys.stdout.write("    " + line)
            sys.stdout.flush()


def run_study(args, drivers: list[Driver], folder: Path, manifest: dict) -> dict:
    """Run every driver not yet "ok" in `manifest`; update and save study.json after each."""
    launcher = shlex.split(manifest["mpiexec"])
    runner = Runner(manifest["np"], launcher, manifest.get("np_flag", "-n"))
    for sig in STOP_SIGNALS:
        signal.signal(sig, runner.on_signal)
    entries = manifest["drivers"]
    if not args.no_calibrate:   # once per kind of host, outside the budget
        calibrate_host(drivers, folder, manifest, CALIBRATE_LIMIT_S)
    deadline = time.time() + args.budget_s - ANALYSIS_RESERVE_S if args.budget_s > 0 else float("inf")
    for i, d in enumerate(drivers, 1):
        if runner.stop_signal:
            break
        entry = entries.setdefault(d.name, {"status": "pending"})
        out = folder / d.out
        if args.resume and set_aside_if_damaged(out, entry):
            entry["status"] = "pending"
        if entry["status"] == "ok":
            print(f"[{i}/{len(drivers)}] {d.name}: done earlier ({entry.get('points')} points), skipped")
            continue
        if not (ROOT / d.script).exists():
            entry.update(status="missing", error=f"{d.script} does not exist")
            print(f"[{i}/{len(drivers)}] {d.name}: {d.script} is missing, skipped")
            write_json(folder / "study.json", manifest)
            continue
        limit = min(d.timeout_s, deadline - time.time())
        if limit < MIN_DRIVER_S:
            entry.update(status="skipped", error=f"study time budget ({args.budget_s:.0f} s) used up")
            print(f"[{i}/{len(drivers)}] {d.name}: skipped, the study's time budget is used up "
                  f"(--resume {folder} runs it later)")
            write_json(folder / "study.json", manifest)
            continue
        help_text = runner.help_text(d.script)
        source = (ROOT / d.script).read_text(errors="replace")
        ckpt = checkpoint_flags(d, folder, help_text)
        if args.resume and "--resume" not in ckpt:  # a driver resuming from its checkpoint keeps its rows
            prepare_resume(out, source, entry)
        argv, dropped = driver_argv(d, manifest["quick"], help_text, out, ckpt)
        print(f"[{i}/{len(drivers)}] {d.name}: {shlex.join(argv)} (limit {limit:.0f} s)", flush=True)
        entry.update(status="running", command=shlex.join(argv), dropped_flags=dropped, log=f"{d.name}.log")
        write_json(folder / "study.json", manifest)
        t0 = time.time()
        rc, status = runner.run(argv, folder / f"{d.name}.log", limit, echo=not args.silent)
        entry.update(status=status, returncode=rc, seconds=round(time.time() - t0, 1), points=count_points(out))
        if status == "ok" and "--save" in ckpt:  # finished: its checkpoints were only there to resume
            shutil.rmtree(ckpt["--save"], ignore_errors=True)
        entry["runs"] = entry.get("runs", 0) + 1
        write_json(folder / "study.json", manifest)
        print(f"[{i}/{len(drivers)}] {d.name}: {status} (rc {rc}, {entry['seconds']} s, "
              f"{entry['points']} points)", flush=True)
        if runner.stop_signal:
            break
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    if runner.stop_signal:
        manifest["interrupted_by"] = signal.Signals(runner.stop_signal).name
        write_json(folder / "study.json", manifest)
    return manifest


def launches_locally(mpiexec: str) -> bool:
    """Is the study's launcher make install's mpiexec, however it is spelled (`make run` passes
    the relative .venv/bin/mpiexec), with or without flags? Batch launchers (srun, a site's
    mpirun) are not: the calibration would start its own mpiexec beside the allocation."""
    words = shlex.split(mpiexec)
    return bool(words) and os.path.realpath(words[0]) == os.path.realpath(DEFAULT_MPIEXEC)


def calibrate_host(drivers: list[Driver], folder: Path, manifest: dict, timeout: float) -> None:
    """Measure this host for mpipar.plan (about a minute) when a driver checks predictions
    against its runs (train_gpt.py) and this kind of host has no calibration yet: the shipped
    local-cpu describes another host. Local launches only (the calibration starts its own
    mpiexec); a failure is a warning, the study goes on with local-cpu."""
    if manifest["quick"] or not any(d.script.endswith("train_gpt.py") for d in drivers):
        return
    from mpipar.plan import host

    if host.cache_path().exists():
        manifest["calibration"] = {"status": "kept earlier", "path": str(host.cache_path())}
        return
    if not launches_locally(manifest["mpiexec"]):
        print("study: no calibration of this host for mpipar.plan; predictions use local-cpu (another host). "
              "`python -m mpipar.plan calibrate` on a node measures it", flush=True)
        return
    ranks = ",".join(str(n) for n in (2, 4) if n <= manifest["np"])
    cmd = [sys.executable, "-m", "mpipar.plan", "calibrate", "--ranks", ranks]
    print(f"study: this host has no calibration for mpipar.plan yet: {shlex.join(cmd[1:])} "
          f"(limit {timeout:.0f} s; kept in {host.cache_path()})", flush=True)
    t0 = time.time()
    with open(folder / "calibrate.log", "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    status = "ok" if rc == 0 else "timeout" if rc is None else "failed"
    manifest["calibration"] = {"status": status, "seconds": round(time.time() - t0, 1), "log": "calibrate.log",
                               "path": str(host.cache_path())}
    write_json(folder / "study.json", manifest)
    print(f"study: calibration {status} ({manifest['calibration']['seconds']} s)"
          + ("" if status == "ok" else ": predictions use local-cpu; see calibrate.log"), flush=True)


def dry_run(drivers: list[Driver], manifest: dict, folder: Path | None) -> None:
    """Print each driver's command and, where it supports --dry-run, the points it would run."""
    runner = Runner(manifest["np"], shlex.split(manifest["mpiexec"]), manifest.get("np_flag", "-n"))
    for d in drivers:
        out = (folder or Path("results/<study>/<timestamp>")) / d.out
        help_text = runner.help_text(d.script) if (ROOT / d.script).exists() else ""
        argv, dropped = driver_argv(d, manifest["quick"], help_text, out, {})
        print(f"== {d.name}: {shlex.join([*runner.launcher, runner.np_flag, str(runner.np), 'python', *argv])}")
        if dropped:
            print(f"   (flags not supported by the driver, dropped: {' '.join(dropped)})")
        if not help_text:
            print("   (driver missing or its --help failed)")
        elif "--dry-run" in help_text:
            cmd = [*runner.launcher, runner.np_flag, str(runner.np), sys.executable, *argv, "--dry-run"]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
            print("\n".join("   " + ln for ln in (res.stdout + res.stderr).splitlines()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--np", type=int, default=4, help="MPI ranks per driver (default 4)")
    p.add_argument("--mpiexec", default=None,
                   help='launcher command, e.g. "mpiexec", "srun --mpi=pmi2" (gets -n NP; default the venv\'s '
                   'mpiexec; given with --resume/--dir it replaces the recorded one: a requeued job\'s hostfile)')
    p.add_argument("--np-flag", default="-n", help="the launcher's rank-count flag (default -n)")
    p.add_argument("--study", default=None, help="study name: results/<study>/... (default scaling)")
    p.add_argument("--results", default=str(ROOT / "results"), help="results root folder")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every driver")
    p.add_argument("--only", action="append", default=[], help="comma list of experiments to run")
    p.add_argument("--config", help="JSON study plan instead of the default one")
    p.add_argument("--resume", metavar="DIR", help="continue the study in DIR (skips completed points)")
    p.add_argument("--dir", metavar="DIR", help="resume DIR if it holds a study, else start one there "
                   "(requeued batch jobs)")
    p.add_argument("--dry-run", action="store_true", help="list the commands and points; run nothing")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="time budget of the whole study in s (drivers get less when it runs out; 0: none)")
    p.add_argument("--no-analysis", action="store_true", help="skip the analysis at the end")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not measure this host for mpipar.plan when it has no calibration yet (about 1 min, "
                   "once per kind of host; the predictions then use the shipped local-cpu)")
    p.add_argument("--silent", action="store_true", help="do not echo the drivers' output")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    name, drivers = load_plan(args.config, args.np)
    if args.dir and (Path(args.dir) / "study.json").exists():
        args.resume = args.dir
    if args.resume:
        folder = Path(args.resume).resolve()
        manifest = json.loads((folder / "study.json").read_text())
        drivers = [Driver(**d) for d in manifest["plan"]]
        if args.mpiexec and args.mpiexec != manifest["mpiexec"]:  # the launcher is the allocation's, not the study's
            print(f"study: launcher {args.mpiexec!r} (recorded: {manifest['mpiexec']!r})", flush=True)
            manifest["mpiexec"] = args.mpiexec
    else:
        drivers = select(drivers, args.only)
        manifest = {"study": args.study or name or "scaling", "created_utc": utc_stamp(), "np": args.np,
                    "mpiexec": args.mpiexec or DEFAULT_MPIEXEC, "np_flag": args.np_flag,
                    "quick": args.quick,
                    "command": shlex.join([sys.executable, *sys.argv]),
                    "plan": [dataclasses.asdict(d) for d in drivers],
                    "drivers": {d.name: {"status": "pending", "out": d.out} for d in drivers}}
        folder = None
    if args.dry_run:
        dry_run(drivers, manifest, folder)
        return 0
    if folder is None and args.dir:
        folder = Path(args.dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
    elif folder is None:
        folder = new_study_dir(Path(args.results).resolve(), manifest["study"])
    else:
        manifest.setdefault("resumed_utc", []).append(utc_stamp())
        manifest.pop("interrupted_by", None)
    print(f"study {manifest['study']}: {folder} (np {manifest['np']}, {manifest['mpiexec']})", flush=True)
    write_json(folder / "study.json", manifest)
    t0 = time.time()
    run_study(args, drivers, folder, manifest)
    interrupted = "interrupted_by" in manifest or any(
        e["status"] in ("interrupted", "running") for e in manifest["drivers"].values())
    if not args.no_analysis and not interrupted:
        from mpipar.analysis.report import analyze, format_summary

        report = analyze([folder], folder, manifest=manifest)
        print(format_summary(report["summary"], manifest))
        for path in report["figures"][:20]:
            print(f"  figure: {path}")
    print(f"study folder: {folder} ({time.time() - t0:.0f} s)")
    bad = [n for n, e in manifest["drivers"].items() if e["status"] in ("failed", "timeout", "skipped")]
    if interrupted:  # 128 + the signal, as the drivers (mpipar.models.preempt.exit_code): a scheduler requeues
        return 128 + signal.Signals[manifest.get("interrupted_by", "SIGTERM")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
