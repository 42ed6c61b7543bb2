"""Causes read from what ranks leave: tracebacks, torchrun's error files, exit statuses; the root
told from its knock-ons. Hostile evidence (cut, huge, stale, not JSON, not UTF-8) lowers what can
be said and never raises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from supervisord_ft.attempt import Tail
from supervisord_ft.causes import CAUSES, Cause, ErrorFile, explain, of_rank, parse_traceback, read_error_file

NONE = ErrorFile(None, None)
GLOO_PEER = ("RuntimeError: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] "
             "Read error [127.0.0.1]:41235: Connection reset by peer")


def traceback_of(code: str, tmp_path: Path) -> tuple[int, str]:
    """Run ``code`` as a script file; its exit status and stderr."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(code))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr


def test_a_real_traceback_names_the_exception_and_the_innermost_frame_of_the_jobs_own_code(tmp_path):
    rc, err = traceback_of("""
        import json
        def load_batch(step):
            return json.loads("{not json")
        load_batch(150)
        """, tmp_path)
    tb = parse_traceback(err)
    assert rc == 1 and tb.exception == "json.decoder.JSONDecodeError"
    assert tb.where == "job.py:4 in load_batch"  # json's own frames are a library's


def test_the_last_traceback_counts_and_lines_after_it_are_not_its_message(tmp_path):
    rc, err = traceback_of("""
        import sys
        def load_batch():
            try:
                {}["x"]
            except KeyError:
                raise ValueError("bad batch")
        try:
            load_batch()
        finally:
            print("UserWarning: something is deprecated", file=sys.stderr)
        """, tmp_path)
    tb = parse_traceback(err)
    assert (tb.exception, tb.message, tb.where) == ("ValueError", "bad batch", "job.py:7 in load_batch")
    assert parse_traceback(err + "\n[W1203 12:00:00] Warning: destroy_process_group() was not called\n") == tb


def test_torchs_rank_prefix_on_each_line_of_a_distributed_ranks_traceback_is_not_in_the_way(tmp_path):
    _, err = traceback_of("""
        def load_batch():
            raise ValueError("no batch")
        load_batch()
        """, tmp_path)
    prefixed = "\n".join(f"[rank1]: {line}" for line in err.splitlines())
    assert parse_traceback(prefixed) == parse_traceback(err) != None


def test_a_traceback_of_ten_thousand_frames_cut_to_its_tail_still_parses():
    tail = Tail()
    tail.add(b"Traceback (most recent call last):")
    for i in range(10_000):
        tail.add(f'  File "/home/u/job.py", line {i + 1}, in f{i}'.encode())
        tail.add(f"    f{i + 1}()".encode())
    tail.add(b"RecursionError: maximum recursion depth exceeded")
    assert tail.size <= 64 << 10 and len(tail.lines) < 20_001
    tb = parse_traceback(tail.text())
    assert tb.exception == "RecursionError" and tb.where == "job.py:10000 in f9999"


def test_bytes_that_are_not_utf8_are_replaced_not_raised():
    tail = Tail()
    for line in (b"Traceback (most recent call last):", b'  File "/j/job.py", line 3, in <module>',
                 b"ValueError: caf\xe9 \xff\xfe"):
        tail.add(line)
    tb = parse_traceback(tail.text())
    assert tb.exception == "ValueError" and "caf\ufffd" in tb.message


def test_no_traceback_is_none():
    assert parse_traceback("") is None
    assert parse_traceback("step 1\nstep 2\nKilled\n") is None


def record_script(tmp_path: Path, error_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "recorded.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from torch.distributed.elastic.multiprocessing.errors import record
        def load_batch(step):
            raise ValueError(f"no batch {step}")
        @record
        def main():
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # nothing on stderr: the file is all there is
            load_batch(150)
        main()
        """))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file), **env})


def test_torch_record_writes_an_error_file_that_is_read_as_the_cause(tmp_path):
    path = tmp_path / "rank-0.error.json"
    proc = record_script(tmp_path, path)
    assert proc.returncode == 1 and proc.stderr == ""
    cause = of_rank(0, proc.returncode, proc.stderr, read_error_file(path, time.time() - 60), False, 0.0)
    assert (cause.cause, cause.source, cause.exception) == ("exception", "error_file", "ValueError")
    assert cause.where == "recorded.py:5 in load_batch" and cause.message == "no batch 150"


def test_an_error_file_missing_is_no_note_and_a_bad_one_says_why(tmp_path):
    assert read_error_file(tmp_path / "none.json", 0) == NONE
    cases = {
        "garbage": b"\x00\xff{{{ not json",
        "wrong shape": json.dumps({"error": 1}).encode(),
        "huge": b" " * ((1 << 20) + 1),
        "stale": json.dumps({"message": {"message": "ValueError: old", "extraInfo": {
            "py_callstack": "", "timestamp": str(int(time.time()) - 3600)}}}).encode(),
    }
    notes = {}
    for name, body in cases.items():
        (tmp_path / name).write_bytes(body)
        got = read_error_file(tmp_path / name, time.time())
        assert got.traceback is None
        notes[name] = got.note
    assert "not torchrun's JSON" in notes["garbage"] and "not torchrun's JSON" in notes["wrong shape"]
    assert "over 1048576 bytes" in notes["huge"] and "before this attempt" in notes["stale"]
    os.mkfifo(tmp_path / "fifo")  # nobody writes it: a blocking open would never return
    assert read_error_file(tmp_path / "fifo", 0).note == "error file is not a regular file"
    (tmp_path / "link").symlink_to(tmp_path / "garbage")
    assert "not readable" in read_error_file(tmp_path / "link", 0).note


def test_torchs_plain_message_format_gives_the_exception_without_a_place(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps({"message": "KeyError: 'w'"}))
    got = read_error_file(tmp_path / "e.json", time.time())
    assert (got.traceback.exception, got.traceback.where) == ("KeyError", None)


def test_each_kind_of_exit_gets_its_cause():
    kill = of_rank(0, -9, "", NONE, oom_killed=True, at=0)
    assert kill.cause == "oom" and kill.outside
    outside = of_rank(0, -9, "Traceback (most recent call last):\n  File \"/j/a.py\", line 1, in f\n"
                             "ValueError: logged and handled long ago\n", NONE, False, 0)
    assert (outside.cause, outside.exception, outside.outside) == ("signal", None, True)
    segv = of_rank(0, -11, 'Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n'
                           '  File "/j/native.py", line 9 in crunch\n  File "/j/job.py", line 3 in <module>\n',
                   NONE, False, 0)
    assert (segv.cause, segv.where, segv.outside) == ("signal", "native.py:9 in crunch", False)
    aborted_after = of_rank(0, -6, "Traceback (most recent call last):\n  File \"/j/job.py\", line 3, in load\n"
                                   "ValueError: no batch\nFATAL: exception not rethrown\n", NONE, False, 0)
    assert (aborted_after.cause, aborted_after.exception) == ("exception", "ValueError")  # torch's exit aborts
    code = of_rank(0, 3, "error: no data in /data\nUserWarning: deprecated\n", NONE, False, 0)
    assert (code.cause, code.message) == ("exit_code", "error: no data in /data")
    assert of_rank(0, 127, "sh: 1: trainx: not found\n", NONE, False, 0).cause == "startup"
    aborted = of_rank(0, -6, "terminate called after throwing an instance of 'gloo::IoException'\n"
                             "  what():  [pair.cc:534] Connection closed by peer [127.0.0.1]:1\n", NONE, False, 0)
    assert aborted.knock_on


def cause(rank: int, at: float, knock_on: bool = False, exception: str = "ValueError") -> Cause:
    return Cause(rank, "exception", GLOO_PEER if knock_on else "bad", "stderr", exception,
                 "job.py:1 in f", 1, knock_on, at)


def test_the_root_is_the_earliest_failure_that_is_not_a_knock_on():
    e = explain([cause(0, at=1.0, knock_on=True), cause(2, at=1.5, knock_on=True), cause(1, at=3.0)], [])
    assert (e.rank, e.root.exception, e.knock_on, e.also_failed) == (1, "ValueError", (0, 2), ())
    every = explain([cause(r, at=2.0 - r / 10) for r in range(4)], [])  # every rank raised at once
    assert every.rank == 3 and every.also_failed == (0, 1, 2) and every.knock_on == ()


def test_with_only_knock_ons_the_stalled_live_rank_is_the_root_else_none_is():
    stalled = Cause(3, "hang", "alive outside the collective", "diagnosis", where="job.py:9 in load")
    e = explain([cause(0, 1.0, knock_on=True)], [stalled])
    assert (e.rank, e.root.cause, e.knock_on) == (3, "hang", (0,))
    lost = explain([cause(0, 1.0, knock_on=True), cause(1, 1.2, knock_on=True)], [])
    assert (lost.rank, lost.root.cause, lost.knock_on) == (None, "peer_lost", (0, 1))


def test_the_readme_documents_every_cause():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "recovery.md").read_text()
    for name, meaning in CAUSES:
        assert f"| `{name}` | {meaning} |" in readme, name
