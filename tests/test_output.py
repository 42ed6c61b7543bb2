"""The line pump, fed through a real asyncio.StreamReader: cutting, decoding, merging, dropping."""

from __future__ import annotations

import asyncio

from harness import MemoryStdout
from supervisord_ft.logs import Log
from supervisord_ft.output import LINE_OVERHEAD, OutputRouter, Source


async def pump(chunks: list[bytes], max_line: int = 16, backlog: int = 1 << 20) -> tuple[list[dict], OutputRouter]:
    sink = MemoryStdout()
    log = Log(None, sink).logger.bind(rank=0)
    router = OutputRouter(max_line, max_backlog_bytes=backlog)
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    reader.feed_eof()
    async with asyncio.timeout(5):
        await router.reader(Source(0, 0, "stdout", log), reader)
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
    assert events[0]["step"] == 3 and "line" not in events[0]
    assert [e["line"] for e in events[1:]] == ["[1,2]", '{"bad":']


async def test_a_full_backlog_drops_lines_and_reports_how_many():
    per_line = 8 + LINE_OVERHEAD
    events, router = await pump([b"".join(b"line %03d\n" % i for i in range(100))], backlog=10 * per_line)
    kept = [e for e in events if e["event"] == "worker_output"]
    dropped = [e for e in events if e["event"] == "worker_output_dropped"]
    assert len(kept) == 10 and kept[0]["line"] == "line 000"
    assert dropped[0]["lines"] == 90 and dropped[0]["level"] == "warning"
