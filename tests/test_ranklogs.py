"""torchrun's per-rank log files (``--log-dir``, ``-r``, ``-t``, ``--local-ranks-filter``): the
layout, what goes to files and what to the daemon's stdout, and a log dir that fails."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from harness import FAKE_WORKER, MemoryStdout, read_events
from supervisord_ft.cli import load_config
from supervisord_ft.errors import ConfigError
from supervisord_ft.logs import Log
from supervisord_ft.ranklogs import RankLogs, Routing
from supervisord_ft.rendezvous import RankInfo

STEPS = [*FAKE_WORKER, "--steps", "3"]


def job_folder(workdir: Path, run_id: str) -> Path:
    """The one job folder torchrun's layout has under the log dir: ``<run id>_<random>``."""
    (folder,) = (workdir / "logs").iterdir()
    assert folder.name.startswith(f"{run_id}_")
    return folder


async def test_redirected_streams_go_to_torchruns_layout_and_stay_off_stdout(daemon, tmp_path):
    d = await daemon("--num-workers", "2", "--log-dir", "logs", "-r", "3",
                     command=[*STEPS, "--print-env"])
    assert await d.finish() == 0
    attempt = job_folder(tmp_path, d.events[0]["run_id"]) / "attempt_0"
    assert sorted(p.name for p in attempt.iterdir()) == ["0", "1"]
    for rank in (0, 1):
        assert sorted(p.name for p in (attempt / str(rank)).iterdir()) == ["stderr.log", "stdout.log"]
        env, *steps = map(json.loads, (attempt / str(rank) / "stdout.log").read_text().splitlines())
        assert steps == [{"event": "step", "step": n, "rank": rank} for n in (1, 2, 3)]
        assert env["env"]["TORCHELASTIC_ERROR_FILE"] == str(attempt / str(rank) / "error.json")
        assert (attempt / str(rank) / "stderr.log").read_text() == ""
    assert d.named("worker_output") == []  # redirected: off the daemon's stdout
    logged = [e for e in read_events(d.events_file) if e["event"] == "worker_output"]
    assert len(logged) == 8  # events.jsonl keeps them
    assert d.named("supervisor_exit", state="DONE")


async def test_tee_and_the_local_ranks_filter_choose_what_stdout_shows(daemon, tmp_path):
    d = await daemon("--num-workers", "3", "--log-dir", "logs", "-t", "1", "--redirects", "0:2",
                     "--local-ranks-filter", "0,1", command=STEPS)
    assert await d.finish() == 0
    attempt = job_folder(tmp_path, d.events[0]["run_id"]) / "attempt_0"
    assert sorted(p.name for p in (attempt / "0").iterdir()) == ["stderr.log", "stdout.log"]
    assert [sorted(p.name for p in (attempt / r).iterdir()) for r in "12"] == [["stdout.log"]] * 2
    assert all(len((attempt / r / "stdout.log").read_text().splitlines()) == 3 for r in "012")
    shown = {(e["rank"], e["stream"]) for e in d.named("worker_output")}
    assert shown == {(0, "stdout"), (1, "stdout")}  # teed; rank 2 filtered out
    logged = read_events(d.events_file)
    assert {e["rank"] for e in logged if e["event"] == "worker_output"} == {0, 1, 2}


async def test_the_files_hold_the_bytes_the_rank_wrote_even_what_the_events_cut(daemon, tmp_path):
    d = await daemon("--num-workers", "1", "--log-dir", "logs", "-t", "3", "--max-line-bytes", "1024",
                     command=[*STEPS, "--long-line", "5000", "--binary"])
    assert await d.finish() == 0
    out = (job_folder(tmp_path, d.events[0]["run_id"]) / "attempt_0" / "0" / "stdout.log").read_bytes()
    assert out.startswith(b"x" * 5000 + b"\nafter long line\nbad \xff\xfe utf8 \x00 nul\n{not json\n")
    assert len(d.named("worker_output", truncated=True)) == 1  # teed: on stdout too, cut there


async def test_a_crash_relaunch_writes_attempt_1_and_the_failure_is_still_explained(daemon, tmp_path):
    d = await daemon("--num-workers", "2", "--log-dir", "logs", "-r", "2", "--jit-checkpoint-timeout", "0",
                     command=[*STEPS, "--fail-rank", "1", "--fail-at-step", "1"])
    assert await d.finish() == 0
    job = job_folder(tmp_path, d.events[0]["run_id"])
    assert sorted(p.name for p in job.iterdir()) == ["attempt_0", "attempt_1"]
    assert (job / "attempt_0" / "1" / "stderr.log").read_text() == "rank 1 failing at step 1\n"
    assert (job / "attempt_1" / "1" / "stderr.log").read_text() == ""
    explained = d.named("failure_explained")[0]  # from the redirected stderr, as without files
    assert (explained["rank"], explained["cause"], explained["message"]) == (1, "exit_code", "rank 1 failing at step 1")


ERROR_FILE_JOB = [sys.executable, "-c", textwrap.dedent("""
    import json, os, time
    if os.environ["RANK"] == "1":
        info = {"py_callstack": "", "timestamp": str(int(time.time()))}
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as fh:
            json.dump({"message": {"message": "ValueError: no batch 150", "extraInfo": info}}, fh)
        raise SystemExit(1)
    """)]


async def test_the_error_file_in_the_log_dir_is_read_for_the_cause(daemon, tmp_path):
    d = await daemon("--num-workers", "2", "--log-dir", "logs", "--max-restarts", "0",
                     command=ERROR_FILE_JOB)
    assert await d.finish() != 0
    attempt = job_folder(tmp_path, d.events[0]["run_id"]) / "attempt_0"
    assert sorted(p.name for p in (attempt / "1").iterdir()) == ["error.json"]  # no stream named
    explained = d.named("failure_explained")[0]
    assert (explained["source"], explained["exception"], explained["message"]) == (
        "error_file", "ValueError", "no batch 150")


async def test_a_log_dir_that_cannot_be_made_is_said_once_and_the_run_goes_on(daemon, tmp_path):
    (tmp_path / "file").write_text("in the way")
    d = await daemon("--num-workers", "2", "--log-dir", str(tmp_path / "file" / "logs"), "-r", "3",
                     command=STEPS)
    assert await d.finish() == 0
    (said,) = d.named("rank_logs_failed")
    assert said["attempt"] == 0 and said["level"] == "warning" and said["reason"]
    assert d.named("supervisor_exit", state="DONE")
    assert len(d.named("worker_output")) == 0  # still redirected: to files that cannot be
    assert len([e for e in read_events(d.events_file) if e["event"] == "worker_output"]) == 6


def in_process(tmp_path: Path, **options) -> tuple[MemoryStdout, Log, RankLogs]:
    """The daemon's log (on a memory stdout) and a RankLogs of ``-r 1`` in ``tmp_path``."""
    sink = MemoryStdout()
    log = Log(None, sink)
    return sink, log, RankLogs(load_config(["run", "--log-dir", str(tmp_path), "-r", "1"]), "job",
                               **options)


async def test_a_file_that_refuses_writes_is_said_once_per_attempt_and_its_output_dropped(tmp_path):
    sink, log, rank_logs = in_process(tmp_path)
    rank_logs.job = tmp_path / "job"
    (tmp_path / "job" / "attempt_0" / "0").mkdir(parents=True)
    os.symlink("/dev/full", tmp_path / "job" / "attempt_0" / "0" / "stdout.log")  # ENOSPC on every write
    files = await rank_logs.open(0, [RankInfo(0, 0, 2, 2), RankInfo(1, 1, 2, 2)], log.logger.bind(attempt=0))
    assert files is not None
    for n in range(3):
        files.write(0, "stdout", b"lost %d\n" % n)
        files.write(1, "stdout", b"kept %d\n" % n)
        files.write(1, "stderr", b"not redirected\n")
    files.close()
    rank_logs.close()
    await asyncio.sleep(0)  # the writer's word reaches the loop
    assert [(e["event"], e["path"]) for e in sink.events()] == [
        ("rank_logs_failed", str(tmp_path / "job" / "attempt_0" / "0" / "stdout.log"))]
    assert (tmp_path / "job" / "attempt_0" / "1" / "stdout.log").read_text() == "kept 0\nkept 1\nkept 2\n"
    assert not (tmp_path / "job" / "attempt_0" / "1" / "stderr.log").exists()


async def test_output_a_stalled_file_system_has_no_room_for_is_dropped_and_said_once(tmp_path):
    sink, log, rank_logs = in_process(tmp_path, max_bytes=10)
    files = await rank_logs.open(0, [RankInfo(0, 0, 1, 1)], log.logger)
    assert files is not None
    for data in (b"fits\n", b"over the bound\n", b"and this\n"):
        files.write(0, "stdout", data)
    rank_logs.close()
    (said,) = sink.events()
    assert said["event"] == "rank_logs_failed" and "stalled file system" in said["reason"]
    assert (files.folder / "0" / "stdout.log").read_bytes() == b"fits\n"


@pytest.mark.parametrize("argv, error", [
    (["--log-dir", "l", "-r", "4"], "redirects: expected 0, 1, 2 or 3, or LOCAL_RANK:0-3 pairs as "
                                    "0:1,1:2 (torchrun's format), got '4'"),
    (["--log-dir", "l", "--tee", "0:1,"], "tee: expected 0, 1, 2 or 3, or LOCAL_RANK:0-3 pairs as "
                                          "0:1,1:2 (torchrun's format), got '0:1,'"),
    (["-t", "0:3"], "tee: '0:3' sends output to files, but no log_dir is given"),
    (["--local-ranks-filter", "0,x"], "local_ranks_filter: expected local ranks as 0,1,2, got '0,x'"),
])
def test_torchruns_formats_are_checked_with_the_key_named(argv, error):
    with pytest.raises(ConfigError) as raised:
        load_config(["run", *argv])
    assert str(raised.value) == error


def test_torchruns_short_flags_and_toml_keys_are_accepted(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('log_dir = "l"\nredirects = "0:1,1:3"\nlocal_ranks_filter = "0"\n')
    c = load_config(["run", "--config", str(toml), "-t", "2"])
    assert (c.log_dir, c.redirects, c.tee, c.local_ranks_filter) == (Path("l"), "0:1,1:3", "2", "0")


TORCHRUN_WORDS = [
    ["-r", "3"],
    ["--tee", "1", "--redirects", "2"],
    ["-r", "0:1,2:3", "-t", "1:2,2:1"],
    ["-t", "3", "--local-ranks-filter", "0,2"],
    ["-r", "1", "--local_ranks_filter", "1"],
    ["--local-ranks-filter", "2"],
]


@pytest.mark.parametrize("words", TORCHRUN_WORDS, ids=" ".join)
def test_each_stream_goes_where_torchrun_sends_it(words, tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.run import config_from_args, get_args_parser

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it in os.environ
    argv = ["--nproc-per-node", "3", "--log-dir", str(tmp_path / "torch"), *words, "job.py"]
    theirs = config_from_args(get_args_parser().parse_args(argv))[0].logs_specs
    assert isinstance(theirs, DefaultLogsSpecs)
    envs = {r: {"TORCHELASTIC_RUN_ID": "job", "TORCHELASTIC_RESTART_COUNT": "2"} for r in range(3)}
    dest = theirs.reify(envs)
    cfg = load_config(argv, torchrun_form=True)
    for r in range(3):
        ours = Routing.of(cfg, r)
        for stream, files, tees in (("stdout", dest.stdouts, dest.tee_stdouts),
                                    ("stderr", dest.stderrs, dest.tee_stderrs)):
            to_file = files[r] not in ("", os.devnull)
            assert to_file == (stream in ours.to_file), (r, stream)
            assert (files[r] == "" or r in tees) == (stream in ours.shown), (r, stream)
            if to_file:
                assert Path(files[r]).relative_to(Path(files[r]).parents[2]) == Path(f"attempt_2/{r}/{stream}.log")
        assert Path(envs[r]["TORCHELASTIC_ERROR_FILE"]).parts[-3:] == ("attempt_2", str(r), "error.json")
