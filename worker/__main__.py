"""``python -m worker``: the built-in training job."""

from .train import main

raise SystemExit(main())
