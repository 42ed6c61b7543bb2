"""``python -m supervisord_ft_worker``: the built-in training job."""

from . import startup  # noqa: F401  first: its clock starts before torch is imported
from .train import main

raise SystemExit(main())
