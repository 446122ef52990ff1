"""Atomic checkpoints of the serial model (no MPI): a full disk mid-save keeps the previous one.

The disk is a small tmpfs (needs root to mount; skipped otherwise) sized for one and a half
checkpoints: the first save fits, the second runs out of space halfway (ENOSPC), is refused
with MpiparError, leaves no folder behind, and the first still loads.
"""
from __future__ import annotations

import os
import socket
import subprocess

import pytest
import torch

from mpipar import models
from mpipar.errors import MpiparError


def model():
    cfg = models.GPTConfig(vocab_size=64, seq_len=32, hidden=64, num_heads=4, num_layers=2, seed=3)
    m = models.GPT(cfg)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-3)


def train(m, opt):
    tokens = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    m(tokens).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def small_disk(tmp_path):
    probe = tmp_path / "probe"
    m, opt = model()
    train(m, opt)
    models.save(m, opt, str(probe))
    size = sum(f.stat().st_size for f in probe.iterdir())
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_keeps_previous_checkpoint(small_disk):
    m, opt = model()
    train(m, opt)
    run = str(small_disk / "run")
    models.save_step(m, opt, run, 1, keep=5)
    first = {k: v.clone() for k, v in m.state_dict().items()}
    train(m, opt)
    with pytest.raises(MpiparError, match="No space left on device"):
        models.save_step(m, opt, run, 2, keep=5)
    assert os.listdir(run) == ["step-000001"]  # the half save was removed
    assert models.latest(run).endswith("step-000001")
    other, opt2 = model()
    assert models.load(other, opt2, run) == {"step": 1}
    assert all(torch.equal(other.state_dict()[k], v) for k, v in first.items())


def test_serial_checkpoint_replaced_atomically_and_leftovers_cleaned(tmp_path):
    m, opt = model()
    path = str(tmp_path / "ck")
    models.save(m, opt, path, extra={"a": 1})
    train(m, opt)
    models.save(m, opt, path, extra={"a": 2})  # replaces the folder: no mix of old and new files
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert models.load(model()[0], None, path) == {"a": 2}
    run = tmp_path / "run"
    run.mkdir()
    (run / ".step-000003.tmp-deadhost-1").mkdir()  # another host's: left alone
    (run / f".step-000002.tmp-{socket.gethostname()}-{_dead_pid()}").mkdir()  # this host, writer gone: removed
    models.save_step(m, opt, str(run), 4)
    assert sorted(os.listdir(run)) == [".step-000003.tmp-deadhost-1", "step-000004"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid
