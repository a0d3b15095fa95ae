"""The one JSON line every bench script ends with: flat, named keys (nested results joined with "_")."""
from __future__ import annotations

import json
from typing import Any


def flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a_b": 1}`; lists and scalars stay values."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}_"))
        else:
            out[name] = value
    return out


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(flat(record))
