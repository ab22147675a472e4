"""Resume state on this instance: a params change sets an interrupted run aside (it does not delete it), and the
evaluation journal is never rewritten in place.

In-process on a temp working directory (the state lives in the relative .ptune/state/), except where a process
must die or hit a file-size limit: that runs in a child process of its own.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ptune.errors import PtuneError
from ptune.state.resume import KEEP_RUNS_ENV, Journal, ResumeState, fingerprint


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(KEEP_RUNS_ENV, raising=False)
    return tmp_path


def _interrupted(params: dict, age_s: int, progress: bool = True) -> Path:
    """The folder of a train run with these params, killed `age_s` seconds ago after saving a checkpoint (or
    before its first one)."""
    run = Path(".ptune/state/train") / fingerprint([], params)
    run.mkdir(parents=True)
    if progress:
        (run / "checkpoint-00000004.safetensors").write_bytes(b"progress " + repr(params).encode())
    t = 1_700_000_000 - age_s
    os.utime(run, (t, t))
    return run


def test_a_params_change_sets_the_interrupted_run_aside_and_says_how_to_resume_it(workdir, caplog):
    old = _interrupted({"learning_rate": 0.02}, age_s=100)
    caplog.set_level(logging.INFO, logger="ptune.state.resume")

    new = ResumeState("train", [], {"learning_rate": 0.01})
    assert (old / "checkpoint-00000004.safetensors").is_file(), "an interrupted run's checkpoints were deleted"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and old.name in warned[0].getMessage() and "restore the params" in warned[0].getMessage()

    # Back to the old params: the old run resumes, and the newer interrupted one is kept in its turn.
    new.path("checkpoint-00000002.safetensors").write_bytes(b"newer progress")
    again = ResumeState("train", [], {"learning_rate": 0.02})
    assert again.dir == old and (again.dir / "checkpoint-00000004.safetensors").is_file()
    assert (new.dir / "checkpoint-00000002.safetensors").is_file()


def test_only_the_newest_runs_are_kept_and_the_pruned_one_is_named(workdir, caplog):
    oldest = _interrupted({"lr": 1}, age_s=300)
    older = _interrupted({"lr": 2}, age_s=200)
    empty = _interrupted({"lr": 3}, age_s=0, progress=False)  # killed before its first checkpoint: nothing lost
    (workdir / ".ptune/state/train/not-a-key").mkdir()
    caplog.set_level(logging.INFO, logger="ptune.state.resume")

    current = ResumeState("train", [], {"lr": 4})
    runs = sorted(p.name for p in (workdir / ".ptune/state/train").iterdir())
    assert runs == sorted([older.name, current.key])  # PTUNE_KEEP_RUNS=2 by default: this run and the last one
    deleted = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "deleting" in r.getMessage()]
    assert len(deleted) == 1 and oldest.name in deleted[0] and KEEP_RUNS_ENV in deleted[0]
    # Nothing lost with the empty run and the stray folder: said at INFO only.
    assert not any(empty.name in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_keep_runs_setting(workdir, monkeypatch):
    old = _interrupted({"lr": 1}, age_s=100)
    monkeypatch.setenv(KEEP_RUNS_ENV, "1")  # the former behaviour, for a disk too small for two runs
    ResumeState("train", [], {"lr": 2})
    assert not old.exists()
    for bad in ("0", "two", "-1", "²"):
        monkeypatch.setenv(KEEP_RUNS_ENV, bad)
        with pytest.raises(PtuneError, match=KEEP_RUNS_ENV):
            ResumeState("train", [], {"lr": 3})


def test_finishing_removes_only_its_own_run(workdir):
    old = _interrupted({"lr": 1}, age_s=100)
    done = ResumeState("train", [], {"lr": 2})
    done.finish()
    assert not done.dir.exists() and old.is_dir()


# A journal larger than the limit below, with a torn last line (a kill mid-append): opening it rewrites it.
_FULL_DISK_REWRITE = """
import resource, signal, sys
from pathlib import Path
from ptune.state.resume import Journal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    Journal(Path(sys.argv[1]))
except OSError as exc:
    print("failed:", exc)
"""


def test_a_journal_rewrite_that_fails_loses_no_finished_batch(tmp_path):
    path = tmp_path / "ptuned.rank0.jsonl"
    journal = Journal(path)
    for batch in range(60):
        journal.record(batch, [f"generated text of batch {batch}, " * 6])
    assert path.stat().st_size > 2 * 4096
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"unit": 60, "value": ["cut sho')
    # The rewrite that drops the torn line meets a full disk (here: a file-size limit) after 4 KiB.
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FULL_DISK_REWRITE), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "failed:" in proc.stdout, proc.stdout + proc.stderr
    # Written in place, the journal would now hold 4 KiB of its 60 batches; through a temp file it holds them all.
    assert sorted(Journal.read_all([path])) == list(range(60))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # and no temp file is left behind

    reopened = Journal(path)  # with room to write: the torn line goes, appends start on a clean line
    reopened.record(60, ["whole"])
    assert Journal.read_all([path])[60] == ["whole"] and len(Journal.read_all([path])) == 61


def test_a_whole_journal_is_not_rewritten_and_foreign_lines_end_it(tmp_path):
    path = tmp_path / "base.rank0.jsonl"
    Journal(path).record(0, ["a"])
    inode = path.stat().st_ino
    Journal(path)
    assert path.stat().st_ino == inode  # nothing to drop, nothing rewritten
    # A line that is JSON but not a journal entry (a journal pulled from a remote is not ours to trust): the
    # entries before it count, it and what follows do not, and nothing raises.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('["unit", 1]\n{"unit": 2, "value": ["b"]}\n')
    assert Journal(path).done == {0: ["a"]}
