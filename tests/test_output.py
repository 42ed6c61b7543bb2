"""The line pump, fed chunks as the loop reads them from a pipe: cutting, decoding, merging, dropping."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from harness import ROOT, MemoryStdout, pid_alive
from supervisord_ft import output, workers
from supervisord_ft.logs import Log
from supervisord_ft.noderdzv import NOTICES
from supervisord_ft.rendezvous import RankInfo
from supervisord_ft.output import (LINE_OVERHEAD, MAX_DEPTH, REDRAW_INTERVAL, RESERVED, LineSplitter,
                                   OutputRouter, Pipe, Source)
from supervisord_ft.workers import WorkerSpec


def feed(pipe: Pipe, chunks: list[bytes]) -> None:
    """Hand ``pipe`` each chunk as the loop's reads would, then the end of the pipe."""
    for chunk in chunks:
        pipe.data_received(chunk)
    pipe.connection_lost(None)


async def pump(chunks: list[bytes], max_line: int = 16, backlog: int = 1 << 20) -> tuple[list[dict], OutputRouter]:
    sink = MemoryStdout()
    log = Log(None, sink).logger.bind(rank=0)
    router = OutputRouter(max_line, max_backlog_bytes=backlog)
    feed(Pipe(router, Source(0, 0, "stdout", log), -1), chunks)
    router.flush()
    return sink.events(), router


async def test_lines_split_across_chunks_are_joined():
    events, _ = await pump([b"hel", b"lo\nwor", b"ld\nlast-no-newline"])
    assert [e["line"] for e in events] == ["hello", "world", "last-no-newline"]


async def test_long_lines_are_cut_marked_and_the_rest_discarded_even_across_chunks():
    events, _ = await pump([b"a" * 10, b"b" * 10, b"c" * 100, b"\nshort\n", b"x" * 17 + b"\nok"])
    assert [(e["line"], e.get("truncated", False)) for e in events] == [
        ("a" * 10 + "b" * 6, True), ("short", False), ("x" * 16, True), ("ok", False)]


async def test_invalid_utf8_is_replaced_and_crlf_trimmed():
    events, _ = await pump([b"\xff\xfeok\r\n"])
    assert events[0]["line"] == "\ufffd\ufffdok"


async def test_json_objects_are_merged_and_reserved_keys_renamed_but_other_json_kept_as_text():
    events, _ = await pump([b'{"event":"step","level":"x","step":3}\n[1,2]\n{"bad":\n'], max_line=64)
    assert events[0]["event"] == "worker_output" and events[0]["level"] == "info"
    assert events[0]["worker_event"] == "step" and events[0]["worker_level"] == "x"
    assert events[0]["worker_step"] == 3 and "line" not in events[0]
    assert [e["line"] for e in events[1:]] == ["[1,2]", '{"bad":']


async def test_a_full_backlog_drops_lines_and_reports_how_many():
    per_line = 8 + LINE_OVERHEAD
    events, router = await pump([b"".join(b"line %03d\n" % i for i in range(100))], backlog=10 * per_line)
    kept = [e for e in events if e["event"] == "worker_output"]
    dropped = [e for e in events if e["event"] == "worker_output_dropped"]
    assert len(kept) == 10 and kept[0]["line"] == "line 000"
    assert dropped[0]["lines"] == 90 and dropped[0]["level"] == "warning"


async def test_drops_are_reported_while_a_flood_never_lets_the_backlog_empty(monkeypatch):
    monkeypatch.setattr(output, "DROP_REPORT_EVERY", 0.0)  # every flush, for the test
    sink = MemoryStdout()
    router = OutputRouter(16, max_backlog_bytes=10 * (8 + LINE_OVERHEAD))
    pipe = Pipe(router, Source(0, 0, "stdout", Log(None, sink).logger.bind(rank=0)), -1)
    pipe.data_received(b"".join(b"line %03d\n" % i for i in range(100)))
    router.flush(limit=1)  # the emitter behind: nine lines still wait
    assert [e["lines"] for e in sink.events() if e["event"] == "worker_output_dropped"] == [90]
    pipe.connection_lost(None)


async def test_any_key_a_worker_uses_is_logged_and_none_overwrites_or_breaks_the_daemons():
    obj = {key: key for key in RESERVED} | {"a-b": 1, "": 2, "1": 3, "worker_event": "mine", "loss": 0.5}
    events, _ = await pump([json.dumps(obj).encode() + b"\n", b"after\n"], max_line=1 << 16)
    merged, after = events
    assert (merged["event"], merged["level"], merged["rank"], merged["stream"]) == (
        "worker_output", "info", 0, "stdout")
    assert {merged["worker_" + key] for key in RESERVED} == set(RESERVED)
    assert (merged["a-b"], merged[""], merged["1"], merged["loss"]) == (1, 2, 3, 0.5)
    assert (merged["worker_event"], merged["worker_worker_event"]) == ("event", "mine")
    assert after["line"] == "after"


LOG_METHODS = {"debug", "info", "warning", "error", "critical", "exception", "bind",
               "_notice"}  # logs.py's own events (log_gap, stdout_dropped, ...)


def _modules() -> Iterator[tuple[Path, list[ast.AST]]]:
    """Each module of the daemon's package and every node of its syntax tree."""
    for path in (ROOT / "supervisord_ft").glob("*.py"):
        yield path, list(ast.walk(ast.parse(path.read_text())))


def _log_calls(nodes: list[ast.AST]) -> Iterator[ast.Call]:
    """The calls of a logger method (either branch of ``(a.warning if x else a.info)(...)``)."""
    for call in (n for n in nodes if isinstance(n, ast.Call)):
        funcs = [call.func.body, call.func.orelse] if isinstance(call.func, ast.IfExp) else [call.func]
        if all(isinstance(f, ast.Attribute) and f.attr in LOG_METHODS for f in funcs):
            yield call


def _fields_the_daemon_logs() -> set[str]:
    """Every keyword of every log call and bind in the package, ``**`` dicts and helpers resolved."""
    fields: set[str] = set()
    for path, nodes in _modules():
        returns = {n.name: [r.value for r in ast.walk(n) if isinstance(r, ast.Return)]
                   for n in nodes if isinstance(n, ast.FunctionDef)}

        def keys(expr: ast.expr) -> set[str]:
            if isinstance(expr, ast.Dict):
                return {k.value for k in expr.keys if isinstance(k, ast.Constant)}
            if isinstance(expr, ast.Call) and isinstance(expr.func, (ast.Name, ast.Attribute)):
                name = expr.func.id if isinstance(expr.func, ast.Name) else expr.func.attr
                if name == "dict":
                    return {k.arg for k in expr.keywords if k.arg}
                return set().union(*map(keys, returns.get(name, [])))
            if isinstance(expr, ast.Name):  # built up in place: assignments and item stores
                found: set[str] = set()
                for n in nodes:
                    if isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None and any(
                            isinstance(t, ast.Name) and t.id == expr.id
                            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])):
                        found |= keys(n.value)
                    if (isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store)
                            and isinstance(n.value, ast.Name) and n.value.id == expr.id
                            and isinstance(n.slice, ast.Constant)):
                        found.add(n.slice.value)
                return found
            raise AssertionError(f"{path.name}:{expr.lineno}: cannot see the keys of **{ast.unparse(expr)}")

        for call in _log_calls(nodes):
            for kw in call.keywords:
                fields |= {kw.arg} if kw.arg else keys(kw.value)
    return fields


def _events_the_daemon_logs() -> set[str]:
    """Every event name the package logs: a log call's first argument, output.py's ``log`` of a
    level picked at run time, and the multi-node helper's notices (a table of names)."""
    names = set(NOTICES.values())
    for _, nodes in _modules():
        calls = [*_log_calls(nodes), *(n for n in nodes if isinstance(n, ast.Call)
                                       and isinstance(n.func, ast.Name) and n.func.id == "log")]
        names |= {c.args[0].value for c in calls if c.args and isinstance(c.args[0], ast.Constant)}
    return names


def test_the_readme_json_log_table_has_a_row_for_every_event_the_daemon_logs_and_no_other():
    section = (ROOT / "docs" / "reference.md").read_text().split("\n## The JSON log\n")[1].split("\n## ")[0]
    documented = {name for row in section.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    logged = _events_the_daemon_logs()
    assert {"worker_output", "rendezvous_retry", "log_gap", "state_changed"} <= logged
    assert logged - documented == set(), "events the JSON log table (docs/reference.md) lacks"
    assert documented - logged == set(), "rows of events nobody logs"


def test_reserved_covers_every_field_of_the_daemons_events_and_every_logging_parameter():
    logged = _fields_the_daemon_logs()
    assert {"from", "to", "rank", "restart", "pid", "returncode", "step", "stream"} <= logged
    assert logged - RESERVED == set()
    bound = structlog.make_filtering_bound_logger(logging.INFO)
    parameters = {*inspect.signature(bound.info).parameters,
                  *inspect.signature(bound._proxy_to_logger).parameters} - {"args", "kw", "event_kw"}
    assert parameters - RESERVED == set()
    assert {"timestamp", "level"} <= RESERVED  # added by the processors


async def test_objects_nested_too_deep_are_kept_as_text_and_logging_goes_on():
    def nested(depth: int) -> bytes:
        return b'{"a":' * depth + b"1" + b"}" * depth

    lines = [nested(MAX_DEPTH), nested(MAX_DEPTH + 1), b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",
             b'{"a":' + b"[" * 900 + b"]" * 900 + b"}", b'{"deep-looking": "[[[[' + b"{" * 40 + b'"}']
    events, _ = await pump([b"\n".join(lines) + b"\nafter\n"], max_line=1 << 16)
    assert "a" in events[0] and "line" not in events[0]
    assert [e["line"].encode() for e in events[1:4]] == lines[1:4]
    assert events[4]["deep-looking"].startswith("[[[[") and events[5]["line"] == "after"


async def test_a_carriage_return_progress_bar_is_logged_at_a_bounded_rate_and_its_end_in_full():
    bar = b"".join(b"\r%3d%%|" % i + b"#" * (i // 10) for i in range(101))
    events, _ = await pump([bar[:1000], bar[1000:], b"\nnext\n"], max_line=64)
    assert [e["line"] for e in events] == ["  0%|", "100%|##########", "next"]


async def test_crlf_is_one_line_end_even_split_across_reads():
    events, _ = await pump([b"a\r\nb\r", b"\nc\r\n\r\n", b"d\r"], max_line=64)
    assert [e["line"] for e in events] == ["a", "b", "c", "", "d"]


def test_redraws_are_logged_at_most_once_per_interval_per_pipe():
    now = [0.0]
    kept: list[bytes] = []
    lines = LineSplitter(64, lambda raw, cut: kept.append(raw), clock=lambda: now[0])
    for i in range(40):  # 5 s of redraws, 8 a second, a chunk each; a line is seen a chunk later
        now[0] = i / 8
        lines.feed(b"\r%02d" % i)
    lines.feed(b"\n")
    assert REDRAW_INTERVAL == 1.0 and kept == [b"00", b"08", b"16", b"24", b"32", b"39"]


@pytest.mark.parametrize("chunks", [[b"no newline " * 10], [b"\r10%", b"\r20%", b"\r30%"]])
async def test_every_chunk_counts_as_liveness_line_or_not(chunks):
    seen: list[Source] = []
    router = OutputRouter(1 << 16, on_bytes=lambda source, data: seen.append(source))
    pipe = Pipe(router, Source(0, 0, "stderr", None), -1)
    for n, chunk in enumerate(chunks, 1):
        pipe.data_received(chunk)
        assert len(seen) == n and seen[-1].stream == "stderr"


async def test_a_python_traceback_on_stderr_is_logged_at_warning_and_other_lines_at_info():
    sink = MemoryStdout()
    log = Log(None, sink).logger.bind(rank=0)
    router = OutputRouter(1024)
    feed(Pipe(router, Source(0, 0, "stderr", log), -1),
         [b"loading data\nTraceback (most recent call last):\n  File \"t.py\", line 1\n"
          b"    boom()\nRuntimeError: boom\nafter it\n"])
    router.flush()
    levels = [(e["line"], e["level"]) for e in sink.events()]
    assert levels == [("loading data", "info"), ("Traceback (most recent call last):", "warning"),
                      ('  File "t.py", line 1', "warning"), ("    boom()", "warning"),
                      ("RuntimeError: boom", "warning"), ("after it", "info")]


async def test_a_grandchild_holding_the_pipes_delays_neither_the_exit_nor_its_last_lines(monkeypatch):
    # A DataLoader worker or a compile pool inherits the rank's stdout and outlives it for a while.
    monkeypatch.setattr(workers, "PIPE_DRAIN_TIMEOUT", 60.0)  # a wait for EOF would be 30 s
    sink = MemoryStdout()
    router = OutputRouter(1024)
    script = "sleep 30 & echo child $!; seq 50000; printf 'no newline'; exit 3"
    spec = WorkerSpec(RankInfo(0, 0, 1, 1), ("sh", "-c", script), dict(os.environ))
    worker = await workers.spawn(spec, 0, workers.SubprocessLauncher(), router,
                                 Log(None, sink).logger.bind(rank=0))
    try:
        async with asyncio.timeout(10):
            assert await worker.exit == 3
        router.flush()
        lines = [e["line"] for e in sink.events() if e["event"] == "worker_output"]
        child = int(lines[0].split()[1])
        assert pid_alive(child)  # it still holds the pipes: no EOF came
        # what the rank wrote, most of it still in the pipe when it exited, is all logged
        assert lines[1:] == [str(i) for i in range(1, 50001)] + ["no newline"]
    finally:
        worker.signal_group(signal.SIGKILL)
