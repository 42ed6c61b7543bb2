"""Configuration: every bad value is exit 2 with one line naming the key."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT
from supervisord_ft.cli import load_config, main
from supervisord_ft.config import MAX_WORKERS, OPTIONS, Config, reference_table
from supervisord_ft.errors import EXIT_CODES

NOT_UTF8 = os.fsdecode(b"caf\xe9")  # how Python hands over argv bytes that are not UTF-8


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(["run", *argv])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, key", [
    (["--num-workers", "0"], "num_workers"),
    (["--num-workers", "two"], "num_workers"),
    (["--max-restarts", "-1"], "max_restarts"),
    (["--grace-period", "-1"], "grace_period"),
    (["--grace-period", "nan"], "grace_period"),
    (["--poll-interval", "0"], "poll_interval"),
    (["--keep-checkpoints", "1"], "keep_checkpoints"),
    (["--log-format", "xml"], "log_format"),
    (["--epochs", "0"], "epochs"),
    (["--crash-rank", "2"], "crash_rank"),          # not < num_workers (2)
    (["--checkpoint-dir", ""], "checkpoint_dir"),
    (["--max-line-bytes", "10"], "max_line_bytes"),
    (["--", "definitely-not-a-command-xyz"], "command"),
    (["--", "./not-executable.sh"], "command"),      # exists, not executable
    (["--epochs", "3", "--", "true"], "epochs"),    # built-in job key with a custom command
    (["--bogus", "1"], "usage"),
    (["--"], "command"),
    (["--num-workers", "1000000000"], "num_workers"),
    (["--master-port", "65536"], "master_port"),
    (["--max-line-bytes", str(10 ** 30)], "max_line_bytes"),
    (["--run-dir", NOT_UTF8], "run_dir"),
    (["--checkpoint-dir", NOT_UTF8], "checkpoint_dir"),
    (["--master-addr", NOT_UTF8], "master_addr"),
    (["--", "true", NOT_UTF8], "command"),
])
def test_bad_command_line_values_exit_2_with_one_line_naming_the_key(capsys, tmp_path, monkeypatch,
                                                                   argv, key):
    monkeypatch.chdir(tmp_path)
    Path("not-executable.sh").write_text("echo hi\n")
    code, err = run_cli(capsys, "--run-dir", str(tmp_path / "r"), "--checkpoint-dir",
                        str(tmp_path / "c"), *argv)
    assert code == 2
    assert err.count("\n") == 1 and key in err, err


@pytest.mark.parametrize("given,endpoint", [("node0", "node0:29400"), ("node0:1234", "node0:1234"),
                                            ("[fd00::1]", "[fd00::1]:29400"), ("[fd00::1]:1234", "[fd00::1]:1234")])
def test_an_endpoint_without_a_port_gets_torchruns_default_ipv6_in_brackets_too(tmp_path, given, endpoint):
    cfg = load_config(["run", "--run-dir", str(tmp_path), "--nnodes", "2", "--rdzv-endpoint", given, "--", "true"])
    assert cfg.rdzv_endpoint == endpoint


@pytest.mark.parametrize("toml, key", [
    ("num_workers = 0", "num_workers"),
    ("num_workers = 1.5", "num_workers"),
    ("num_workers = true", "num_workers"),
    ("grace_period = 'long'", "grace_period"),
    ("max_restarts = -3", "max_restarts"),
    ("unknown_key = 1", "unknown_key"),
    ("command = 'python train.py'", "command"),
    ("command = []", "command"),
    ("env = { A = 1 }", "env"),
    ("num_workers = ", "not valid TOML"),
    ("num_workers = 100000000000000000000000", "num_workers"),
    ('run_dir = "a\\u0000b"', "run_dir"),
    ('command = ["true", "a\\u0000b"]', "command"),
    ('[env]\n"A=B" = "x"', "env"),
    ('[env]\n"" = "x"', "env"),
    ('[env]\n"A\\u0000" = "x"', "env"),
    ('[env]\nA = "x\\u0000y"', "env"),
])
def test_bad_toml_values_exit_2_with_one_line_naming_the_key(capsys, tmp_path, toml, key):
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml + "\n")
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2
    assert err.count("\n") == 1 and key in err, err


def test_missing_config_file_and_unwritable_dir_are_config_errors(capsys, tmp_path):
    code, err = run_cli(capsys, "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "not found" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(capsys, "--run-dir", str(tmp_path / "r"),
                        "--checkpoint-dir", str(blocker / "sub"), "--", "true")
    assert code == 2 and "checkpoint_dir" in err and err.count("\n") == 1


def test_a_config_file_that_is_not_utf8_and_an_events_file_that_is_a_directory_are_refused(
        capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_bytes(b"num_workers = 2 # caf\xe9\n")
    code, err = run_cli(capsys, "--config", str(cfg))
    assert code == 2 and err.count("\n") == 1 and "is not UTF-8 text: byte 0xe9 at offset 21" in err
    (tmp_path / "r" / "events.jsonl").mkdir(parents=True)
    code, err = run_cli(capsys, "--run-dir", str(tmp_path / "r"), "--checkpoint-dir", str(tmp_path / "c"),
                        "--", "true")
    assert code == 2 and err.count("\n") == 1 and "run_dir: cannot append to" in err, err


def test_too_few_open_files_for_num_workers_is_refused_or_the_soft_limit_raised(tmp_path):
    def run(soft: int, hard: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisord_ft", "run", "--num-workers", "40", "--log-format", "json",
             "--run-dir", "r", "--checkpoint-dir", "c", "--", "true"],
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
            capture_output=True, text=True, cwd=tmp_path, timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)})

    refused = run(64, 64)
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    assert refused.stderr.count("\n") == 1 and "RLIMIT_NOFILE allows 64" in refused.stderr
    assert run(64, 4096).returncode == 0  # the soft limit is raised, as daemons do


def test_command_line_wins_over_toml_which_wins_over_defaults(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('num_workers = 4\nmax_restarts = 7\ncommand = ["python3", "x.py"]\n'
                   '[env]\nFOO = "bar"\n')
    c = load_config(["run", "--config", str(cfg), "--num_workers", "3"])
    assert (c.num_workers, c.max_restarts, c.grace_period) == (3, 7, Config.grace_period)
    assert c.command == ("python3", "x.py") and c.env == {"FOO": "bar"}
    c = load_config(["run", "--config", str(cfg), "--", "true", "--lr", "0.1"])
    assert c.command == ("true", "--lr", "0.1")


def test_seed_spellings_are_accepted():
    c = load_config(["run", "--num_workers", "2", "--epochs", "20", "--steps", "30",
                     "--checkpoint_interval", "10", "--max_restarts", "3", "--poll_interval", "1",
                     "--checkpoint_dir", "ck"])
    assert (c.num_workers, c.epochs, c.steps, c.checkpoint_interval, c.max_restarts,
            c.poll_interval, c.checkpoint_dir) == (2, 20, 30, 10, 3, 1.0, Path("ck"))


def test_every_option_is_in_the_readme_and_in_help():
    readme = (ROOT / "docs" / "reference.md").read_text()
    help_text = subprocess.run([sys.executable, "-m", "supervisord_ft", "run", "--help"],
                               capture_output=True, text=True, cwd=ROOT, check=True).stdout
    # The whole table, as generated: print it with
    # python -c 'from supervisord_ft.config import reference_table; print(reference_table())'
    assert reference_table() in readme
    for opt in OPTIONS:
        assert opt.flags[0] in help_text, opt.name
    for code, meaning in EXIT_CODES:
        assert f"| {code} | {meaning} |" in readme
        assert meaning.replace("`", "") in " ".join(help_text.split()), code
    assert f"at most {MAX_WORKERS}" in " ".join(help_text.split()) and f"{MAX_WORKERS}" in readme


def test_the_real_process_exits_2_on_bad_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "supervisord_ft", "run", "--num-workers", "-2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "supervisord-ft: error: num_workers (from command line): must be >= 1, got -2"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # their relative paths are relative to the repository root
    cfg = load_config(["run", "--config", str(path)])
    assert cfg.num_workers >= 1


@pytest.mark.parametrize("toml, args, says", [
    (b"# caf\xe9\n", [], "run.toml is not UTF-8 text: byte 0xe9 at offset 5"),
    (b'[env]\n"A=B" = "x"\n', [], "env (from run.toml): 'A=B' is not a variable name"),
    (b'[env]\nA = "x\\u0000"\n', [], "env (from run.toml): A contains a NUL byte: 'x\\x00'"),
    (b'command = ["true", "\\u0000"]\n', [], "argument 1 contains a NUL byte"),
    (None, ["--run-dir", NOT_UTF8], "run_dir (from command line) is not valid UTF-8: b'caf\\xe9'"),
    (None, ["--checkpoint-dir", NOT_UTF8], "checkpoint_dir (from command line) is not valid UTF-8"),
    (None, ["--num-workers", "1000000000"], f"must be <= {MAX_WORKERS}, got 1000000000"),
    (None, ["--run-dir", "events-dir"], "run_dir: cannot append to 'events-dir/events.jsonl': Is a directory"),
], ids=["config-not-utf8", "env-key-with-equals", "env-value-with-nul", "command-with-nul",
        "run-dir-not-utf8", "checkpoint-dir-not-utf8", "a-billion-workers", "events-file-a-directory"])
async def test_the_daemon_refuses_bad_input_in_one_line_before_anything_starts(daemon, tmp_path, toml,
                                                                             args, says):
    (tmp_path / "events-dir" / "events.jsonl").mkdir(parents=True)
    if toml is not None:
        (tmp_path / "run.toml").write_bytes(toml)
        args = ["--config", "run.toml", *args]
    d = await daemon(*args, command=["true"])
    assert await d.finish(timeout=30) == 2
    assert d.stderr.count("\n") == 1 and d.stderr.startswith("supervisord-ft: error: ")
    assert says in d.stderr, d.stderr
    assert d.events == [] and not (tmp_path / "run").exists()
    assert not list(tmp_path.glob("caf*"))
