"""JSON that keeps numbers exact, as the contract asks: floats are read as :class:`~decimal.Decimal`
and written back digit for digit; integers are Python ints (unbounded) already."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def loads(data: str | bytes) -> Any:
    """Parses JSON, reading every non-integer number as a ``Decimal``."""
    return json.loads(data, parse_float=Decimal)


def dumps(value: Any) -> str:
    """Serialises ``value`` as compact JSON. ``Decimal`` values are written exactly; NaN and
    infinities (which JSON cannot hold) raise ``ValueError``, unknown types ``TypeError``."""
    parts: list[str] = []
    _encode(value, parts, 0)
    return "".join(parts)


_MAX_DEPTH = 200


def _encode(value: Any, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError("value nests too deeply for JSON")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} cannot be written as JSON")
        out.append(str(value))
    elif isinstance(value, float):
        out.append(json.dumps(value, allow_nan=False))
    elif value is None or isinstance(value, (bool, int, str)):
        out.append(json.dumps(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (k, v) in enumerate(value.items()):
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be strings, not {type(k).__name__}")
            if i:
                out.append(",")
            out.append(json.dumps(k))
            out.append(":")
            _encode(v, out, depth + 1)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(",")
            _encode(v, out, depth + 1)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} is not JSON serialisable")
