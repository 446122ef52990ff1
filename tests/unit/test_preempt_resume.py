"""train_gpt.py under `mpiexec -n 2`: preempted by SIGTERM, killed -9 mid-save, damaged checkpoints.

- SIGTERM to mpiexec mid-run: the ranks finish the step in hand, save, exit 143; `--resume` then
  gives every later step exactly the loss of an uninterrupted run (same layout), and the killed
  run's rows stay in /results/train_gpt.
- kill -9 of the whole job while a save is paused (MPIPAR_CHECKPOINT_PAUSE_S): the previous
  checkpoint is the newest complete one, the half save is never picked, resuming from it again
  repeats the uninterrupted losses, and the next save removes the leftover.
- a changed byte in a shard: `--resume` of that step folder is refused naming the shard; of the
  run folder it falls back to the older step with a warning naming it.
- a pickle payload planted in a shard (manifest consistent) is refused naming the file; it never runs.
- a fresh run (no --resume) refuses a --save folder holding another run's checkpoints, losing nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MPIEXEC = ROOT / ".venv" / "bin" / "mpiexec"
SCRIPT = ROOT / "experiments" / "train_gpt.py"
STEPS = 24
ARGS = ["--quick", "--tp", "2", "--microbatches", "2", "--steps", str(STEPS), "--log-every", "1"]

pytestmark = [pytest.mark.skipif(not MPIEXEC.exists(), reason="needs the venv's mpiexec (make install)"),
              pytest.mark.timeout(240)]


def cmd(*extra):
    return ["timeout", "120", str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPT), *ARGS, *extra]


def env(**more):
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **more}


def run(*extra, **more):
    return subprocess.run(cmd(*extra), capture_output=True, text=True, cwd=ROOT, env=env(**more), timeout=150)


def losses(path) -> dict[int, float]:
    with h5py.File(path, "r") as f:
        g = f["results/train_gpt"]
        steps, values = g["step"][()].tolist(), g["loss"][()].tolist()
    assert len(steps) == len(set(steps)), f"a step stored twice: {steps}"
    return dict(zip(steps, values))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    res = run("--out", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    ref = losses(out)
    assert sorted(ref) == list(range(STEPS))
    return ref


def start(*extra, **more):
    return subprocess.Popen(cmd(*extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=env(**more), start_new_session=True)


def wait_for(proc, text, limit=90):
    """Read proc's output until a line contains `text`; returns all lines read."""
    lines, t0 = [], time.time()
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
        assert time.time() - t0 < limit, "".join(lines)
    raise AssertionError(f"{text!r} never came:\n" + "".join(lines))


def test_sigterm_mid_run_then_resume_repeats_the_losses(tmp_path, reference):
    out, ckpt = tmp_path / "run.h5", tmp_path / "ckpt"
    proc = start("--out", str(out), "--save", str(ckpt), "--save-every", "100")
    wait_for(proc, "step    3")
    proc.send_signal(signal.SIGTERM)  # to mpiexec, which forwards it to both ranks
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    assert "signal 15: saved" in rest
    kept = losses(out)
    stopped = max(kept) + 1
    assert 4 <= stopped < STEPS and sorted(kept) == list(range(stopped)), kept  # rows kept up to the stop
    assert sorted(os.listdir(ckpt)) == [f"step-{stopped:06d}"]  # saved right after the last stored step
    res = run("--out", str(out), "--save", str(ckpt), "--resume", str(ckpt))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"steps {stopped}..{STEPS - 1}" in res.stdout
    assert losses(out) == reference  # every step, bit for bit


def test_kill9_during_save_keeps_previous_checkpoint(tmp_path, reference):
    out, ckpt = tmp_path / "run.h5", tmp_path / "ckpt"
    proc = start("--out", str(out), "--save", str(ckpt), "--save-every", "4", MPIPAR_CHECKPOINT_PAUSE_S="30")
    t0 = time.time()
    while not any(n.startswith(".step-000008.tmp") for n in (os.listdir(ckpt) if ckpt.exists() else [])):
        assert proc.poll() is None and time.time() - t0 < 120, proc.stdout.read()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and both ranks, mid-save of step 8
    proc.wait(timeout=30)
    names = sorted(os.listdir(ckpt))
    assert names[-1] == "step-000004" and names[0].startswith(".step-000008.tmp"), names
    from mpipar.models import checkpoint

    assert checkpoint.latest(str(ckpt)) == str(ckpt / "step-000004")
    res = run("--out", str(out), "--save", str(ckpt), "--save-every", "4", "--keep", "3", "--resume", str(ckpt))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"steps 4..{STEPS - 1}" in res.stdout
    assert losses(out) == reference
    assert sorted(os.listdir(ckpt)) == [f"step-{s:06d}" for s in (16, 20, 24)]  # leftover gone, 3 kept


def _set_manifest_entry(folder: Path, name: str, data: bytes) -> None:
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_damaged_or_poisoned_checkpoint_is_refused_naming_the_file(tmp_path):
    out, ckpt = tmp_path / "run.h5", tmp_path / "ckpt"
    res = run("--out", str(out), "--save", str(ckpt), "--save-every", "4", "--steps", "8")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = losses(out)
    res = run("--out", str(out), "--save", str(ckpt), "--steps", "8")  # a fresh run onto another run's folder
    assert res.returncode != 0 and "already holds checkpoints of another run" in res.stdout + res.stderr
    assert losses(out) == rows and sorted(os.listdir(ckpt)) == ["step-000004", "step-000008"]  # nothing lost
    shard = ckpt / "step-000008" / "shard-pp0-tp1.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    res = run("--out", str(out), "--resume", str(ckpt / "step-000008"), "--steps", "10")
    assert res.returncode != 0 and "shard shard-pp0-tp1.pt is corrupt" in res.stdout + res.stderr
    res = run("--out", str(out), "--resume", str(ckpt), "--steps", "10")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert "shard-pp0-tp1.pt is corrupt" in text and "falling back" in text and "steps 4..9" in text

    marker = tmp_path / "PAYLOAD_RAN"
    buf = io.BytesIO()
    torch.save({"params": {"x": _Payload(marker)}, "optim": {}}, buf)
    _set_manifest_entry(ckpt / "step-000004", "shard-pp0-tp0.pt", buf.getvalue())
    res = run("--out", str(out), "--resume", str(ckpt / "step-000004"), "--steps", "10")
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "file shard-pp0-tp0.pt holds objects other than tensors" in text, text[-3000:]
    assert not marker.exists()
