"""Strict JSON (RFC 8259) for one-line records: the daemon's events and a worker's own lines.

Python writes a NaN or infinite float as the bare tokens ``NaN`` / ``Infinity`` (and reads them
back), which Go, JavaScript, serde, jq and most log pipelines reject. Here such a value becomes
``null``, and the key that holds it gets a sibling ``<key>_nonfinite`` with the original spelled
``"nan"``, ``"inf"`` or ``"-inf"``; when the key holds a list, the sibling is a list of the same
shape with those names where the list had them and ``null`` elsewhere. Objects nested at any depth
are treated the same way. Torch-free and tiny: ``supervisord_ft_worker.contract`` uses it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

NONFINITE_SUFFIX = "_nonfinite"


def encoder(**options: Any) -> Callable[[Any], str]:
    """A compact, strict ``json`` encoder with ``options`` (e.g. ``default=str``).

    Finite data, the common case, is encoded once by the C encoder; only a record that holds a
    non-finite float is rewritten and encoded again.
    """
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                              **options).encode

    def dumps(obj: Any) -> str:
        try:
            return encode(obj)
        except ValueError:  # "Out of range float values are not JSON compliant"
            return encode(finite(obj))

    return dumps


dumps = encoder()


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` and named in a sibling key."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out[key] = finite(item)
            if (names := _names(item)) is not None:
                out[f"{key}{NONFINITE_SUFFIX}"] = names
        return out
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _names(value: Any) -> Any:
    """What ``<key>_nonfinite`` holds for ``value``, or None when it needs no such key."""
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        names = [_names(item) for item in value]
        return names if any(n is not None for n in names) else None
    return None
