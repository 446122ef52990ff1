"""mpipar.settings: one frozen object read from the environment, documented from its fields."""
from __future__ import annotations

import dataclasses
import pathlib

import pytest

from mpipar import MpiparError, settings


def test_readme_table_is_made_from_the_fields():
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings.markdown_table() in readme


def test_parse_and_defaults():
    s = settings.Settings.from_environ({"MPIPAR_CROSSOVER_ALL_REDUCE": "64", "MPIPAR_SHM_CHUNK_BYTES": " 1024 ",
                                        "MPI_LOCALNRANKS": "3", "MPIPAR_VALIDATE": "0",
                                        "OMPI_COMM_WORLD_LOCAL_RANK": "2"})
    assert dict(s.crossover) == {"all_reduce": 64} and s.shm_chunk_bytes == 1024
    assert s.local_size == 3 and s.local_rank == 2 and s.validate == "0" and s.cuda_aware == "auto" and s.threads is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.validate = "1"
    with pytest.raises(MpiparError, match="MPIPAR_RING_PIECE_BYTES"):
        settings.Settings.from_environ({"MPIPAR_RING_PIECE_BYTES": "1MiB"})


def test_digest_covers_agreed_fields_only():
    base = settings.Settings.from_environ({})
    assert base.agreed_digest() == settings.Settings.from_environ({"MPIPAR_THREADS": "3"}).agreed_digest()
    assert base.agreed_digest() != settings.Settings.from_environ({"MPIPAR_VALIDATE": "0"}).agreed_digest()
    assert base.agreed_digest() != settings.Settings.from_environ(
        {"MPIPAR_SHM_CROSSOVER_BROADCAST": "1"}).agreed_digest()


def test_env_follows_monkeypatch_and_override(monkeypatch):
    monkeypatch.setenv("MPIPAR_OUTPUT_POOL_BYTES", "7")
    assert settings.current().output_pool_bytes == 7
    with settings.override(output_pool_bytes=9):
        assert settings.current().output_pool_bytes == 9
    assert settings.current().output_pool_bytes == 7
