"""JSON-safe copies of free-form metadata, for the attributes of the files stemforge writes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: Arrays larger than this are summarised instead of copied: metadata is not a data store.
MAX_ARRAY_ITEMS = 1024


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` made of dicts, lists, strings, finite numbers, booleans and None.

    NumPy scalars and small arrays become numbers and lists, bytes are decoded, large
    arrays a short description, non-finite floats None, and anything else its ``str``.
    Dictionary keys become strings.
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.size > MAX_ARRAY_ITEMS:
            return f"<array shape={value.shape} dtype={value.dtype}>"
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
