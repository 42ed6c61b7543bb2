"""Configuration: every bad value is exit 2 with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT
from supervisord_ft.cli import load_config, main
from supervisord_ft.config import OPTIONS, Config, reference_table
from supervisord_ft.errors import EXIT_CODES


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
])
def test_bad_command_line_values_exit_2_with_one_line_naming_the_key(capsys, tmp_path, monkeypatch,
                                                                   argv, key):
    monkeypatch.chdir(tmp_path)
    Path("not-executable.sh").write_text("echo hi\n")
    code, err = run_cli(capsys, "--run-dir", str(tmp_path / "r"), "--checkpoint-dir",
                        str(tmp_path / "c"), *argv)
    assert code == 2
    assert err.count("\n") == 1 and key in err, err


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
    readme = (ROOT / "README.md").read_text()
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
