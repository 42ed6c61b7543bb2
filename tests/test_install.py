"""The Makefile does what the README says: honest install options, and test-fast skips the slow."""

from __future__ import annotations

import shlex
import subprocess
import sys

from harness import ROOT


def make_dry_run(*args: str) -> list[str]:
    """The commands `make` would run, without running them."""
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.splitlines()


def test_test_fast_collects_neither_the_soak_nor_the_end_to_end_tests():
    line = next(line for line in make_dry_run("test-fast") if "pytest" in line)
    argv = shlex.split(line)
    argv = [sys.executable, *argv[argv.index("-m"):], "--collect-only", "-q"]
    collected = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "test_config.py" in collected  # it does collect the fast ones
    assert "test_soak.py" not in collected and "test_e2e.py" not in collected


def test_the_cpu_index_is_an_option_and_off_by_default():
    default = [line for line in make_dry_run("-B", "venv") if "pip install" in line]
    cpu = [line for line in make_dry_run("-B", "venv", "TORCH_INDEX=cpu") if "pip install" in line]
    assert default and not any("--extra-index-url" in line for line in default)
    assert any("--extra-index-url https://download.pytorch.org/whl/cpu" in line for line in cpu)
