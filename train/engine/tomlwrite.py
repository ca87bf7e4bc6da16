"""The resolved config as TOML text (``tomllib`` only reads): what ``OUTPUT/config.toml`` and every checkpoint
hold, and what reads back with ``tomllib`` to the same values."""

from __future__ import annotations

import math
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else "nan"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml_value(key)


def to_toml(cfg: dict[str, dict[str, Any]]) -> str:
    """The config as TOML text (reads back with ``tomllib`` to the same values)."""
    lines = []
    for table, body in cfg.items():
        lines.append(f"[{table}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)
