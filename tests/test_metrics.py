"""Metrics, /healthz and /readyz: real scrapes of a real daemon, and the view fed by hand."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import taken_port, FAKE_WORKER
from supervisord_ft import httpd
from supervisord_ft.config import build
from supervisord_ft.errors import ConfigError
from supervisord_ft.httpd import Response, Server
from supervisord_ft.metrics import MIN_SCRAPE_INTERVAL, RATE_WINDOW, Metrics


async def http(port: int, request: bytes, timeout: float = 10) -> tuple[int, bytes]:
    """Send a raw request to 127.0.0.1:port; the status code and the body."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await reader.read()
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def get(port: int, path: str) -> tuple[int, bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def scrape(port: int) -> dict[str, float]:
    """Every sample as ``name{label="v",...}`` → value."""
    status, body = await get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


async def metrics_port(d) -> int:
    return (await d.wait_for(lambda e: e["event"] == "metrics_listening"))["port"]


def step_of(rank: int, attempt: int, at_least: int = 1):
    return lambda e: (e.get("worker_event") == "step" and e["rank"] == rank
                      and e["attempt"] == attempt and e["worker_step"] >= at_least)


async def test_a_scrape_during_a_run_with_a_crash_shows_state_restarts_steps_and_recovery(daemon):
    d = await daemon("--num-workers", "2", "--max-restarts", "2", "--metrics-port", "0",
                     command=[*FAKE_WORKER, "--steps", "400", "--step-time", "0.05",
                              "--fail-rank", "1", "--fail-at-step", "3"])
    port = await metrics_port(d)
    assert (await get(port, "/healthz"))[0] == 200
    await d.wait_for(lambda e: e["event"] == "recovered")
    for rank in (0, 1):
        await d.wait_for(step_of(rank, attempt=1, at_least=5))
    m = await scrape(port)
    assert m['supervisord_ft_state{state="RUNNING"}'] == 1
    assert m['supervisord_ft_state{state="RECOVERING"}'] == 0
    assert m["supervisord_ft_attempt"] == 1
    assert m["supervisord_ft_restarts_total"] == 1 and m["supervisord_ft_restarts_in_window"] == 1
    assert m["supervisord_ft_recovery_seconds_count"] == 1
    assert 0 < m["supervisord_ft_recovery_seconds_sum"] < 30
    assert m['supervisord_ft_failures_total{cause="exit_code"}'] == 1  # the fake worker's exit 1
    assert 0 <= m['supervisord_ft_recovery_phase_seconds_total{phase="teardown"}'] < 30
    assert m['supervisord_ft_rank_up{rank="0"}'] == m['supervisord_ft_rank_up{rank="1"}'] == 1
    assert m['supervisord_ft_rank_last_step{rank="1"}'] >= 5
    assert 0 <= m['supervisord_ft_rank_last_output_age_seconds{rank="0"}'] < 10
    assert m["supervisord_ft_steps_per_second"] > 0
    assert m['supervisord_ft_output_lines_total{stream="stdout"}'] >= 10
    assert m['supervisord_ft_output_lines_total{stream="stderr"}'] >= 1  # the failing rank's last words
    assert m["supervisord_ft_output_lines_dropped_total"] == 0
    assert m["process_resident_memory_bytes"] > 1e6 and m["process_open_fds"] > 3
    assert "supervisord_ft_checkpoint_step" not in m  # the fake worker writes none
    assert await get(port, "/readyz") == (200, b"ready\n")
    d.signal(15)
    assert await d.finish() == 143


async def test_a_taken_metrics_port_is_exit_2_before_anything_starts(daemon, tmp_path: Path):
    with taken_port() as port:
        d = await daemon("--metrics-port", str(port), command=[*FAKE_WORKER])
        assert await d.finish() == 2
    assert d.stderr.strip() == (f"supervisord-ft: error: metrics_port: cannot listen on "
                                f"127.0.0.1:{port}: Address already in use")
    events = tmp_path / "run" / "events.jsonl"  # start-up checks may create it, never write it
    assert d.events == [] and (not events.exists() or events.read_text() == "")


def test_a_metrics_port_out_of_range_or_shared_with_master_port_is_refused():
    with pytest.raises(ConfigError, match=r"^metrics_port \(from command line\): must be <= 65535, got 70000$"):
        build({}, {"metrics_port": "70000"})
    with pytest.raises(ConfigError, match="^metrics_port: 29500 is also master_port$"):
        build({"master_port": 29500}, {"metrics_port": "29500"})


async def test_a_thousand_idle_clients_cost_bounded_memory_and_training_goes_on(daemon):
    d = await daemon("--num-workers", "2", "--metrics-port", "0",
                     command=[*FAKE_WORKER, "--steps", "2000", "--step-time", "0.02"])
    port = await metrics_port(d)
    await d.wait_for(step_of(0, attempt=0))
    await scrape(port)  # the first scrape allocates what every scrape needs
    before = rss_kb(d.proc.pid)
    idle: list[asyncio.StreamWriter] = []
    try:
        for i in range(1000):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            if i % 2:  # half of them start a request and never finish it
                writer.write(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            idle.append(writer)
        step = max(e["worker_step"] for e in d.named("worker_output", worker_event="step"))
        assert await get(port, "/healthz") == (200, b"ok\n")
        assert (await get(port, "/readyz"))[0] == 200
        await d.wait_for(step_of(0, attempt=0, at_least=step + 5))  # training went on
        held = len(list(Path(f"/proc/{d.proc.pid}/fd").iterdir()))
        grown = rss_kb(d.proc.pid) - before
    finally:
        for writer in idle:
            writer.transport.abort()
    assert grown < 8 * 1024, f"RSS grew {grown} kB for 1000 idle clients"
    assert held < 40 + httpd.MAX_CONNECTIONS, f"{held} fds held with 1000 clients connected"
    d.signal(15)
    assert await d.finish() == 143


async def test_only_get_is_served_and_bad_requests_are_refused():
    server = Server({"/x": lambda: Response(200, b"x\n")})
    await server.start("metrics", "127.0.0.1", 0)
    try:
        p = server.port
        assert await get(p, "/x?debug=1") == (200, b"x\n")
        for method in ("POST", "PUT", "DELETE", "HEAD", "PATCH"):
            assert (await http(p, f"{method} /x HTTP/1.1\r\n\r\n".encode()))[0] == 405
        assert (await get(p, "/nope"))[0] == 404
        assert (await http(p, b"garbage\r\n\r\n"))[0] == 400
        big = b"GET /x HTTP/1.1\r\nX: " + b"a" * (2 * httpd.MAX_REQUEST_BYTES) + b"\r\n\r\n"
        assert (await http(p, big))[0] == 431
    finally:
        await server.close()


async def test_a_client_that_never_finishes_is_dropped_after_the_timeout(monkeypatch):
    monkeypatch.setattr(httpd, "CONNECTION_TIMEOUT", 0.2)
    server = Server({"/x": lambda: Response(200, b"x\n")})
    await server.start("metrics", "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /x HTTP/1.1\r\n")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server, not by us
        writer.close()
    finally:
        await server.close()


# -- the view, fed by hand --------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fed(*events: dict) -> tuple[Metrics, Clock]:
    clock = Clock()
    m = Metrics(clock)
    for e in events:
        m.observe(e)
    return m, clock


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


START = {"event": "supervisor_start", "config": {"restart_window": 60.0}}


def launching(attempt: int, n: int = 2) -> dict:
    return {"event": "launching", "attempt": attempt, "num_workers": n}


def state(to: str, restart: int = 0) -> dict:
    return {"event": "state_changed", "to": to, "restart": restart}


def step(rank: int, attempt: int, n: int) -> dict:
    return {"event": "worker_output", "rank": rank, "attempt": attempt, "stream": "stdout",
            "worker_event": "step", "worker_step": n}


def test_ready_only_when_running_and_every_rank_stepped_in_the_current_attempt():
    m, _ = fed(START, launching(0), state("RUNNING"), step(0, 0, 1))
    assert m.unready_reason() == "1 of 2 ranks have stepped"
    m.observe(step(1, 0, 1))
    assert m.unready_reason() is None
    m.observe(state("RECOVERING"))
    assert m.unready_reason() == "state is RECOVERING"
    for e in (state("LAUNCHING", restart=1), launching(1), state("RUNNING", restart=1),
              step(0, 0, 2), step(1, 0, 2), step(0, 1, 1)):  # late lines of attempt 0 do not count
        m.observe(e)
    assert m.unready_reason() == "1 of 2 ranks have stepped"
    m.observe(step(1, 1, 1))
    assert m.unready_reason() is None


def test_ages_rates_and_the_restart_window_are_computed_when_scraped():
    m, clock = fed(START, launching(0), state("RUNNING"),
                   {"event": "worker_started", "rank": 0, "attempt": 0})
    for n in range(1, 11):
        clock.now += 0.5
        m.observe(step(0, 0, n))
    assert sample(m, "supervisord_ft_steps_per_second") == 2.0
    clock.now += 3
    assert sample(m, "supervisord_ft_rank_last_output_age_seconds", rank="0") == 3
    clock.now += RATE_WINDOW
    assert sample(m, "supervisord_ft_steps_per_second") == 0.0  # stalled for a whole window
    m.observe(state("RECOVERING"))
    m.observe(state("LAUNCHING", restart=1))
    assert sample(m, "supervisord_ft_restarts_total") == 1
    assert sample(m, "supervisord_ft_restarts_in_window") == 1
    clock.now += 61
    assert sample(m, "supervisord_ft_restarts_in_window") == 0
    assert sample(m, "supervisord_ft_restarts_total") == 1


def test_the_newest_checkpoint_comes_from_selection_and_from_the_workers_saves():
    m, clock = fed(START, {"event": "checkpoint_selected", "step": 20, "mtime": time.time() - 100})
    assert sample(m, "supervisord_ft_checkpoint_step") == 20
    assert 99 <= sample(m, "supervisord_ft_checkpoint_age_seconds") <= 110
    m.observe(launching(1))
    m.observe({"event": "worker_output", "rank": 0, "attempt": 1, "stream": "stdout",
               "worker_event": "checkpoint_saved", "worker_step": 30})
    clock.now += 4
    assert sample(m, "supervisord_ft_checkpoint_step") == 30
    assert sample(m, "supervisord_ft_checkpoint_age_seconds") == 4


def test_hangs_and_dropped_lines_are_counted():
    m, _ = fed(START, launching(0),
               {"event": "hang_detected", "rank": 1, "attempt": 0, "silent_for": 7.5},
               {"event": "worker_output_dropped", "rank": 0, "attempt": 0, "lines": 1234})
    assert sample(m, "supervisord_ft_hang_detection_seconds_count") == 1
    assert sample(m, "supervisord_ft_hang_detection_seconds_bucket", le="10.0") == 1
    assert sample(m, "supervisord_ft_hang_detection_seconds_bucket", le="5.0") == 0
    assert sample(m, "supervisord_ft_output_lines_dropped_total") == 1234


def hang(rank: int, attempt: int, silent_for: float, timeout: float = 90.0) -> dict:
    return {"event": "hang_detected", "rank": rank, "attempt": attempt, "silent_for": silent_for,
            "before_first_step": False, "timeout": timeout}


def test_a_hang_is_counted_once_for_all_its_ranks_and_the_limit_in_force_is_a_gauge():
    m, _ = fed({"event": "supervisor_start", "config": {"restart_window": 60.0, "hang_timeout": 600.0}},
               launching(0))
    assert sample(m, "supervisord_ft_hangs_total") == 0
    assert sample(m, "supervisord_ft_hang_timeout_seconds") == 600  # until the cadence is learnt
    m.observe({"event": "hang_timeout_learnt", "timeout": 90.0, "longest_interval": 0.05,
               "samples": 10, "cap": 600.0})
    assert sample(m, "supervisord_ft_hang_timeout_seconds") == 90
    for rank, silent in ((1, 95.5), (0, 94.0), (2, 93.0)):  # every live rank is declared hung
        m.observe(hang(rank, 0, silent))
    assert sample(m, "supervisord_ft_hangs_total") == 1
    assert sample(m, "supervisord_ft_hang_detection_seconds_count") == 3  # a sample per rank
    for e in (launching(1), hang(0, 1, 130.0, timeout=120.0), hang(1, 1, 125.0, timeout=120.0)):
        m.observe(e)
    assert sample(m, "supervisord_ft_hangs_total") == 2
    assert sample(m, "supervisord_ft_hang_timeout_seconds") == 120  # as the hang says it was
    m.observe({"event": "hang_timeout_learnt", "timeout": "garbled"})  # ignored, not fatal
    assert sample(m, "supervisord_ft_hang_timeout_seconds") == 120


def test_failures_are_counted_by_cause_and_recovery_phases_summed_garbage_skipped():
    m, _ = fed(START, launching(0),
               {"event": "failure_explained", "attempt": 0, "rank": 1, "cause": "exception"},
               {"event": "recovered", "attempt": 1, "seconds": 1.5,
                "phases": {"detection": 0.01, "teardown": 0.25, "relaunch": "slow", "diagnosis": -1}},
               {"event": "failure_explained", "attempt": 1, "rank": None, "cause": "peer_lost"},
               {"event": "recovered", "attempt": 2, "seconds": 1.0, "phases": "garbled"})
    assert sample(m, "supervisord_ft_failures_total", cause="exception") == 1
    assert sample(m, "supervisord_ft_failures_total", cause="peer_lost") == 1
    assert sample(m, "supervisord_ft_recovery_phase_seconds_total", phase="teardown") == 0.25
    assert sample(m, "supervisord_ft_recovery_phase_seconds_total", phase="relaunch") is None
    assert sample(m, "supervisord_ft_recovery_seconds_count") == 2


def test_without_a_metrics_port_prometheus_client_is_not_even_imported():
    code = ("import sys, asyncio; from supervisord_ft.config import Config; "
            "from supervisord_ft.logs import EventBus; from supervisord_ft.service import Service; "
            "s = Service(Config(), EventBus()); assert s.server is None and s.metrics is None; "
            "assert 'prometheus_client' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_scrapes_closer_than_the_minimum_interval_get_the_previous_body():
    m, clock = fed(START, launching(0), state("RUNNING"), step(0, 0, 1))
    first = m.exposition()
    m.observe(step(0, 0, 2))
    assert m.exposition() is first  # rendering is not repeated for a client scraping in a loop
    clock.now += MIN_SCRAPE_INTERVAL
    assert b'supervisord_ft_rank_last_step{rank="0"} 2.0' in m.exposition()
