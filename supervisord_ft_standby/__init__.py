"""Torch-side helpers the daemon runs beside the ranks: warm standby interpreters and the store host.

Everything here may import torch; nothing in ``supervisord_ft`` imports this package. Each helper
talks to the daemon over pipes in JSON lines (see :mod:`supervisord_ft_standby.lines`); the daemon side of each
protocol is one module (``supervisord_ft.standby``, ``supervisord_ft.storehost``).
"""
