"""Parsing of limit values at the edge: sizes, durations and CPU counts.

Every limit enters the library here once and leaves as a plain typed number (bytes as ``int``,
seconds as ``float``, cores as ``float``); nothing inside passes unit strings around.
Each parser raises ``ValueError`` with a message that names the accepted form, which the models
turn into :class:`~parity_sandbox.InvalidInput`.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

SIZE_FORM = "a whole number of bytes, or a number with a unit k, m, g or t (e.g. 512m, 1g, 1.5g)"
DURATION_FORM = "seconds as a number, or a number with a unit ms, s, m or h (e.g. 30s, 5m, 1.5)"
CPU_FORM = "a positive number of cores (e.g. 0.5, 1, 2.0)"
COUNT_FORM = "a positive whole number"

_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Return a size in bytes from an int or a string such as ``"512m"`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; expected {SIZE_FORM}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match:
            number, unit = match.groups()
            size = float(number) * _SIZE_UNITS[unit.lower()]
            if size.is_integer() or unit:
                return int(size)
    raise ValueError(f"{value!r} is not a size; expected {SIZE_FORM}")


def parse_duration(value: object) -> float:
    """Return seconds from a number, a ``timedelta`` or a string such as ``"5m"``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; expected {DURATION_FORM}")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    if isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match:
            number, unit = match.groups()
            return float(number) * _DURATION_UNITS[(unit or "").lower()]
    raise ValueError(f"{value!r} is not a duration; expected {DURATION_FORM}")


def parse_cpu(value: object) -> float:
    """Return a CPU allowance in cores from a number or a numeric string such as ``"1.0"``."""
    if not isinstance(value, bool):
        try:
            cores = float(value) if isinstance(value, int | float | str) else math.nan
        except ValueError:
            cores = math.nan
        if math.isfinite(cores):
            return cores
    raise ValueError(f"{value!r} is not a CPU allowance; expected {CPU_FORM}")


def parse_count(value: object) -> int:
    """Return a whole count from an int or a decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise ValueError(f"{value!r} is not a count; expected {COUNT_FORM}")


def format_size(size: int) -> str:
    """Render bytes in the largest binary unit that divides them evenly (``"512m"``)."""
    for unit in ("t", "g", "m", "k"):
        factor = _SIZE_UNITS[unit]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


#: How a mount's folder may end: ``:ro`` (read-only, the default) or ``:rw`` (a writable copy).
MOUNT_MODES = (":ro", ":rw")


def split_mount(value: str) -> tuple[str, bool]:
    """A mount's folder and whether the task gets a writable copy of it: ``"fixture"`` and
    ``"fixture:ro"`` are read-only, ``"fixture:rw"`` writable; a tree under ``/work`` is
    always a writable copy (the workspace is the task's own)."""
    if value.endswith(MOUNT_MODES):
        return value[:-3], value.endswith(":rw")
    return value, False
