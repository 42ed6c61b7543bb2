"""Write this rank's environment as JSON to ``DIR/rank-<RANK>.json`` and exit: what a launcher gave it.

    torchrun --standalone --nproc-per-node 2 tests/jobs/dump_env.py DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    Path(sys.argv[1], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(dict(os.environ)))
