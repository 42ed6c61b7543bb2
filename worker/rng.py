"""The RNG streams a CPU training process draws from (torch, python ``random``, numpy), as checkpoint data.

States are stored as tensors and primitives only, so a checkpoint holding them still loads with
``torch.load(weights_only=True)``; restoring them makes a resumed rank draw the very numbers it
would have drawn had it never stopped.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's legacy seeding takes 32 bits


def capture() -> dict[str, Any]:
    version, mt_state, gauss_next = random.getstate()
    key, np_state, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "key": key,
            "state": torch.from_numpy(np_state.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
    }


def restore(state: dict[str, Any]) -> None:
    """Undo :func:`capture`: every stream continues exactly where it was captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["key"], npy["state"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
