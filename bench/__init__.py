"""The benchmark suite: supervisord-ft against ``torchrun --max-restarts`` on the same job (see BENCHMARKS.md)."""
