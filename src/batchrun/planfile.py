"""The plan file's container: a versioned JSON header, an orjson records blob, and raw numpy arrays.

Layout: MAGIC, an 8-byte little-endian header length, the header (JSON), then 64-byte aligned sections.
Arrays load as read-only memory maps, so a plan of a million requests opens in about a second. Writes go to
a temporary file in the same folder, fsynced and renamed over the target: a reader sees the old plan or the
new one, never half of one.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchrun.errors import UserError

MAGIC = b"BATCHRUN-PLAN\n"
FORMAT_VERSION = 1
ALIGN = 64


def write_container(path: Path, header: dict[str, Any], records: Any, arrays: dict[str, np.ndarray]) -> None:
    """Writes header + records + arrays atomically to `path`."""
    blob = orjson.dumps(records)
    sections: list[tuple[str, bytes | np.ndarray]] = [("records", blob)]
    sections += [(name, np.ascontiguousarray(a)) for name, a in arrays.items()]
    table: dict[str, Any] = {}
    offset = 0
    for name, data in sections:
        offset = _aligned(offset)
        nbytes = len(data) if isinstance(data, bytes) else data.nbytes
        entry: dict[str, Any] = {"offset": offset, "nbytes": nbytes}
        if isinstance(data, np.ndarray):
            entry |= {"dtype": data.dtype.str, "shape": list(data.shape)}
        table[name] = entry
        offset += nbytes
    head = orjson.dumps({**header, "format_version": FORMAT_VERSION, "sections": table})
    base = _aligned(len(MAGIC) + 8 + len(head))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(head)) + head)
            for name, data in sections:
                f.seek(base + table[name]["offset"])
                f.write(data if isinstance(data, bytes) else memoryview(data).cast("B"))  # no copy of the array
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header and the file offset where sections start; UserError when `path` is not a plan."""
    try:
        with path.open("rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise UserError(f"{path}: not a batchrun plan (make one with `batchrun plan INPUT.jsonl`)")
            (length,) = struct.unpack("<Q", f.read(8))
            header = orjson.loads(f.read(length))
    except FileNotFoundError:
        raise UserError(f"{path}: no such plan file") from None
    except (struct.error, orjson.JSONDecodeError):
        raise UserError(f"{path}: the plan file is damaged; make it again with `batchrun plan`") from None
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: plan format {version} is not supported by this batchrun "
                        f"(it reads format {FORMAT_VERSION}); make the plan again with `batchrun plan`")
    return header, _aligned(len(MAGIC) + 8 + length)


def read_records(path: Path, header: dict[str, Any], base: int) -> Any:
    entry = header["sections"]["records"]
    with path.open("rb") as f:
        f.seek(base + entry["offset"])
        data = f.read(entry["nbytes"])
    if len(data) != entry["nbytes"]:
        raise UserError(f"{path}: the plan file is truncated; make it again with `batchrun plan`")
    return orjson.loads(data)


def read_arrays(path: Path, header: dict[str, Any], base: int) -> dict[str, np.ndarray]:
    """Every array section, memory-mapped read-only (zero-length arrays are plain empty arrays)."""
    size = path.stat().st_size
    arrays = {}
    for name, entry in header["sections"].items():
        if "dtype" not in entry:
            continue
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        if base + entry["offset"] + entry["nbytes"] > size:
            raise UserError(f"{path}: the plan file is truncated; make it again with `batchrun plan`")
        if entry["nbytes"] == 0:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=base + entry["offset"], shape=shape)
    return arrays


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN
