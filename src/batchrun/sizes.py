"""Byte sizes as people write them: `--kv-budget 4GiB` read (parse_size), and amounts shown in the plan
summary and the run report (human_bytes)."""

from __future__ import annotations

import re

from batchrun.errors import UserError

MAX_SIZE = 1e18  # bytes: an exabyte, far above any machine, far below int64


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '2G', '1e9' or a plain number of bytes → bytes; UserError when it is not a size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise UserError(f"{text!r} is not a size (examples: 4GiB, 512MiB, 2000000000)", exit_code=2)
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3).startswith("i")
    power = "_kmgt".index(unit) if unit else 0
    size = number * (1024 if binary else 1000) ** power
    if not size < MAX_SIZE:  # 1e400 is inf: no budget is that large
        raise UserError(f"{text!r} is too large a size (at most {MAX_SIZE:.0e} bytes)", exit_code=2)
    return int(size)


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB': binary units, one decimal (whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
