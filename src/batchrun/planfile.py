"""The plan file: a Plan saved as a versioned JSON header, an orjson records blob, and raw numpy arrays.

save_plan / load_plan map a Plan onto that container; load_plan_header reads the header alone. Layout: MAGIC,
an 8-byte little-endian header length, the header (JSON), then 64-byte aligned sections. Arrays load as
read-only memory maps, so a plan of a million requests opens in about a second. Writes go to a temporary file
in the same folder, fsynced and renamed over the target: a reader sees the old plan or the new one, never half
of one.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchrun.errors import UserError
from batchrun.plan import Plan, PlanHeader, layout_numbers
from batchrun.planner import PlanLayout
from batchrun.requests import InvalidLine, Request, SamplingParams
from batchrun.tokens import TokenTable

MAGIC = b"BATCHRUN-PLAN\n"
FORMAT_VERSION = 1
ALIGN = 64
# A request's record: its fields in declared order with its sampling parameters inlined (as their fields).
_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(Request) if f.name != "sampling")
_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def check_plan_target(path: Path, *, input_path: Path) -> None:
    """Refuses (UserError) to write a plan to `path` unless it is new or an old plan: never the input, a
    folder, or any other file that batchrun did not write."""
    if path.is_dir():
        raise UserError(f"{path} is a folder: give the plan file's path (e.g. {path / 'job.plan'})", exit_code=2)
    if not path.exists():
        return
    if os.path.samefile(path, input_path):
        raise UserError(f"{path} is the input file: give the plan another name (-o JOB.plan)", exit_code=2)
    if not path.is_file() or not _starts_with_magic(path):
        raise UserError(f"{path} exists and is not a batchrun plan: batchrun writes only over an old plan; "
                        "choose another name (-o JOB.plan)", exit_code=2)


def save_plan(plan: Plan, path: Path) -> None:
    """Writes the plan atomically (see write_container), where check_plan_target allows."""
    check_plan_target(path, input_path=Path(plan.header.input_path))
    records = {
        "requests": [_request_record(r) for r in plan.requests],
        "invalid": [list(dataclasses.astuple(r)) for r in plan.invalid],
    }
    arrays = {"tokens": plan.tokens.tokens, "token_indptr": plan.tokens.indptr}
    arrays |= {f"layout.{f.name}": getattr(plan.layout, f.name) for f in dataclasses.fields(plan.layout)
               if isinstance(getattr(plan.layout, f.name), np.ndarray)}
    write_container(path, {"plan": plan.header.to_json(), "layout": layout_numbers(plan.layout)}, records, arrays)


def load_plan(path: Path) -> Plan:
    """The plan at `path`, its arrays memory-mapped; UserError when it is not a plan of this format."""
    header, base = read_header(path)
    records = read_records(path, header, base)
    arrays = read_arrays(path, header, base)
    with _damaged_if_malformed(path):
        layout_fields = {f.name: arrays.get(f"layout.{f.name}", header["layout"].get(f.name))
                         for f in dataclasses.fields(PlanLayout)}
        return Plan(
            header=PlanHeader.from_json(header["plan"]),
            requests=[_request_from_record(r) for r in records["requests"]],
            invalid=[InvalidLine(*r) for r in records["invalid"]],
            tokens=TokenTable(arrays["tokens"], arrays["token_indptr"]),
            layout=PlanLayout(**layout_fields),
        )


def load_plan_header(path: Path) -> PlanHeader:
    """The header alone (fast): for checks and summaries that need no arrays."""
    header, _ = read_header(path)
    with _damaged_if_malformed(path):
        return PlanHeader.from_json(header["plan"])


@contextmanager
def _damaged_if_malformed(path: Path) -> Iterator[None]:
    """A plan whose parts do not fit together (damaged, or written by another batchrun) is a UserError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f"{path}: the plan file is damaged or was made by another version of batchrun "
                        f"({type(e).__name__}: {e}); make it again with `batchrun plan`") from None


def _request_record(r: Request) -> list[Any]:
    return [*(getattr(r, name) for name in _REQUEST_FIELDS),
            *(getattr(r.sampling, name) for name in _SAMPLING_FIELDS)]


def _request_from_record(record: Sequence[Any]) -> Request:
    values = dict(zip((*_REQUEST_FIELDS, *_SAMPLING_FIELDS), record, strict=True))
    sampling = {name: values.pop(name) for name in _SAMPLING_FIELDS}
    sampling["stop"] = tuple(sampling["stop"])  # JSON has no tuples
    return Request(**values, sampling=SamplingParams(**sampling))


# -- the container ----------------------------------------------------------------------------------------------


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


def _starts_with_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN
