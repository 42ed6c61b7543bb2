"""Checkpoint discovery: the newest intact file wins; every bad file is skipped with a reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import ROOT
from supervisord_ft import checkpoints as ck
from supervisord_ft.errors import CheckpointError


def save(directory: Path, step: int, size: int = 1000) -> Path:
    state = {"w": torch.arange(size, dtype=torch.float32), "step": step}
    return ck.atomic_write(ck.checkpoint_path(directory, step), lambda fh: torch.save(state, fh))


def reasons(directory: Path) -> dict[str, str]:
    return {r.path.name: r.reason for r in ck.discover(directory).rejected}


def test_newest_intact_checkpoint_is_selected(tmp_path):
    for step in (10, 30, 20):
        save(tmp_path, step)
    found = ck.discover(tmp_path)
    assert found.newest == ck.Checkpoint(30, tmp_path / "checkpoint_step_30.pt")
    assert found.rejected == []
    assert torch.load(found.newest.path, weights_only=True)["step"] == 30


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path):
    assert ck.discover(tmp_path).newest is None
    assert ck.discover(tmp_path / "absent").newest is None


def corrupt_truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def corrupt_zero(p: Path) -> None:
    p.write_bytes(b"")


def corrupt_garbage(p: Path) -> None:
    p.write_bytes(os.urandom(4096))


def corrupt_bitflip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor payload: torch.load would not notice
    p.write_bytes(bytes(data))


def corrupt_not_torch(p: Path) -> None:
    import zipfile
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "a zip, but not a torch.save file")


def rewrite_members(p: Path, change) -> None:
    """Rewrite the archive with ``change(name, data)`` applied (None drops the member): every CRC
    in the result is valid, so only the deeper checks can tell."""
    import zipfile
    with zipfile.ZipFile(p) as z:
        members = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(p, "w") as z:
        for name, data in members:
            if (data := change(name, data)) is not None:
                z.writestr(name, data)


def corrupt_pickle_cut(p: Path) -> None:
    rewrite_members(p, lambda n, d: d[: len(d) // 2] if n.endswith("data.pkl") else d)


def corrupt_storage_missing(p: Path) -> None:
    rewrite_members(p, lambda n, d: None if "/data/" in n else d)


def corrupt_storage_short(p: Path) -> None:
    rewrite_members(p, lambda n, d: d[:-4] if "/data/" in n else d)


def corrupt_directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def corrupt_symlink(p: Path) -> None:
    target = p.with_name("elsewhere.bin")
    p.rename(target)
    p.symlink_to(target)


@pytest.mark.parametrize("corrupt, reason", [
    (corrupt_truncated, "truncated or garbage"),
    (corrupt_zero, "empty"),
    (corrupt_garbage, "truncated or garbage"),
    (corrupt_bitflip, "CRC"),
    (corrupt_not_torch, "not a torch.save file"),
    (corrupt_pickle_cut, "not a complete torch pickle"),
    (corrupt_storage_missing, "missing from the archive"),
    (corrupt_storage_short, "needs 4000"),
    (corrupt_directory, "not a regular file"),
    (corrupt_symlink, "symlink"),
])
def test_a_bad_newest_file_is_skipped_with_its_reason_and_the_previous_one_is_used(tmp_path, corrupt, reason):
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    corrupt(newest)
    found = ck.discover(tmp_path)
    assert found.newest is not None and found.newest.step == 10
    assert reason in reasons(tmp_path)[newest.name]


def test_deeper_checks_accept_every_state_the_built_in_job_writes(tmp_path):
    state = {"model": torch.nn.Linear(4, 2).state_dict(), "opt": {"buf": [torch.zeros(2, dtype=torch.float64)]},
             "steps": torch.arange(3), "flags": torch.tensor([True]), "half": torch.ones(2, dtype=torch.bfloat16),
             "empty": torch.zeros(0), "view": torch.arange(10.0)[2:5], "meta": {"a": [1, 2.5, "x", None]}}
    p = ck.atomic_write(ck.checkpoint_path(tmp_path, 1), lambda fh: torch.save(state, fh))
    ck.verify(p)


def test_bitflip_goes_unnoticed_by_torch_but_not_by_discovery(tmp_path):
    p = save(tmp_path, 5, size=100_000)
    corrupt_bitflip(p)
    torch.load(p, weights_only=True)  # torch loads the corrupted tensor without complaint
    with pytest.raises(CheckpointError, match="CRC"):
        ck.verify(p)


def test_misnamed_files_temporaries_and_huge_step_numbers_are_never_candidates(tmp_path):
    good = save(tmp_path, 7)
    data = good.read_bytes()
    (tmp_path / "checkpoint_step_abc.pt").write_bytes(data)
    (tmp_path / "checkpoint_step_12.pt.bak").write_bytes(data)
    (tmp_path / ("checkpoint_step_" + "9" * 30 + ".pt")).write_bytes(data)
    (tmp_path / ".checkpoint_step_99.pt.tmp-123").write_bytes(data[:100])  # a write in progress
    (tmp_path / "notes.txt").write_text("unrelated")
    found = ck.discover(tmp_path)
    assert found.newest.step == 7
    assert set(reasons(tmp_path)) == {"checkpoint_step_abc.pt", "checkpoint_step_12.pt.bak",
                                      "checkpoint_step_" + "9" * 30 + ".pt"}


def test_atomic_write_failure_leaves_no_final_name_and_keeps_the_old_file(tmp_path):
    old = save(tmp_path, 10)

    def write_half_then_fail(fh):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        ck.atomic_write(ck.checkpoint_path(tmp_path, 20), write_half_then_fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]
    assert ck.discover(tmp_path).newest.step == 10


def test_stale_temporaries_are_removed(tmp_path):
    save(tmp_path, 1)
    stale = tmp_path / ".checkpoint_step_2.pt.tmp-999"
    stale.write_bytes(b"partial")
    assert ck.remove_stale_temporaries(tmp_path) == [stale]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_step_1.pt"]


def test_prune_keeps_the_newest_intact_and_the_protected_one(tmp_path):
    for step in (10, 20, 30, 40, 50):
        save(tmp_path, step)
    corrupt_garbage(tmp_path / "checkpoint_step_50.pt")  # a bad newest does not count as kept
    removed = ck.prune(tmp_path, keep=2, protect=[tmp_path / "checkpoint_step_10.pt"])
    assert sorted(p.name for p in removed) == ["checkpoint_step_20.pt"]
    left = sorted(ck.parse_step(p.name) for p in tmp_path.iterdir())
    assert left == [10, 30, 40, 50]


@pytest.mark.parametrize("mode", ["replace", "exclusive"])  # exclusive: a just-in-time save
def test_a_writer_sigkilled_mid_write_leaves_only_a_temporary_that_is_never_selected(tmp_path, mode):
    old = save(tmp_path, 10)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), mode], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert writer.stdout.readline().strip() == "half written"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    temporaries = [p for p in tmp_path.iterdir() if ck.TEMP_MARKER in p.name]
    assert len(temporaries) == 1 and temporaries[0].stat().st_size > 0
    assert ck.discover(tmp_path).newest == ck.Checkpoint(10, old)
    assert ck.remove_stale_temporaries(tmp_path) == temporaries


# Writes half of a checkpoint's bytes through atomic_write, says so, then waits to be killed.
WRITER = """
import sys, time
from supervisord_ft import checkpoints as ck
def write(fh):
    fh.write(b"PK\\x03\\x04" + b"x" * 100000)
    fh.flush()
    print("half written", flush=True)
    time.sleep(60)
ck.atomic_write(ck.checkpoint_path(sys.argv[1], 20), write, exclusive=sys.argv[2] == "exclusive")
"""


def test_exclusive_writers_of_one_step_cannot_clash_the_first_to_finish_wins(tmp_path):
    target = ck.checkpoint_path(tmp_path, 5)
    assert ck.atomic_write(target, lambda fh: fh.write(b"first"), exclusive=True) == target
    assert ck.atomic_write(target, lambda fh: fh.write(b"second"), exclusive=True) == target
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the loser's temporary is gone


def test_prune_does_not_read_back_the_file_just_written_but_reads_it_once_changed(tmp_path, monkeypatch):
    for step in (10, 20):
        save(tmp_path, step)
    reads = []
    real_verify = ck.verify
    monkeypatch.setattr(ck, "verify", lambda p: reads.append(p.name) or real_verify(p))
    written = tmp_path / "checkpoint_step_20.pt"
    assert ck.prune(tmp_path, keep=1, written=written) == [tmp_path / "checkpoint_step_10.pt"]
    assert reads == []  # the newest counted as intact unread: no CRC pass beside training
    corrupt_garbage(written)
    save(tmp_path, 5)
    ck.prune(tmp_path, keep=1)
    assert reads == ["checkpoint_step_20.pt", "checkpoint_step_5.pt"] and written.exists()


def test_prune_reads_each_unchanged_kept_file_once(tmp_path, monkeypatch):
    for step in (10, 20, 30, 40):
        save(tmp_path, step)
    reads = []
    real_verify = ck.verify
    monkeypatch.setattr(ck, "verify", lambda p: reads.append(p.name) or real_verify(p))
    oldest = [tmp_path / "checkpoint_step_10.pt"]
    ck.prune(tmp_path, keep=3, protect=oldest)
    ck.prune(tmp_path, keep=3, protect=oldest)
    assert sorted(reads) == ["checkpoint_step_20.pt", "checkpoint_step_30.pt", "checkpoint_step_40.pt"]
    corrupt_garbage(tmp_path / "checkpoint_step_40.pt")  # a changed file is read again, and fails
    ck.prune(tmp_path, keep=2, protect=oldest)
    assert reads[-1] == "checkpoint_step_40.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_step_10.pt", "checkpoint_step_20.pt", "checkpoint_step_30.pt", "checkpoint_step_40.pt"]


def test_prune_reads_nothing_while_no_file_could_go(tmp_path, monkeypatch):
    for step in (10, 20):
        save(tmp_path, step)
    monkeypatch.setattr(ck, "verify", lambda p: pytest.fail(f"{p.name} read"))
    assert ck.prune(tmp_path, keep=2) == []
