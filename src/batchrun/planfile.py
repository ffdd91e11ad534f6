"""The plan file: a Plan saved as a versioned JSON header, an orjson records blob, and raw numpy arrays.

save_plan / load_plan map a Plan onto that container; load_plan_header reads the header alone. Layout: MAGIC,
an 8-byte little-endian header length, the header (JSON, with each section's blake2b digest), the header's
blake2b digest, then 64-byte aligned sections. Every digest is verified on load: a changed byte is refused.
Arrays load as read-only memory maps. Writes go to a temporary file in the same folder, fsynced and renamed
over the target: a reader sees the old plan or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from batchrun.errors import UserError
from batchrun.plan import Plan, PlanHeader, layout_numbers
from batchrun.plan_integrity import check_layout, invalid_from_record, request_from_record
from batchrun.planner import PlanLayout
from batchrun.requests import Request, SamplingParams
from batchrun.tokens import TokenTable

MAGIC = b"BATCHRUN-PLAN\n"
FORMAT_VERSION = 2  # 2: a blake2b digest after the header and in every section's entry
ALIGN = 64
DIGEST_SIZE = 32
ARRAY_DTYPES = ("<i4", "<i8")  # int32 and int64, little-endian: the only arrays a plan holds
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
    if input_path.exists() and os.path.samefile(path, input_path):
        raise UserError(f"{path} is the input file: give the plan another name (-o JOB.plan)", exit_code=2)
    if not path.is_file() or not _starts_with_magic(path):
        raise UserError(f"{path} exists and is not a batchrun plan: batchrun writes only over an old plan; "
                        "choose another name (-o JOB.plan)", exit_code=2)


def save_plan(plan: Plan, path: Path) -> None:
    """Writes the plan atomically (see write_container), where check_plan_target allows."""
    check_plan_target(path, input_path=plan.header.input_file(path))
    records = {
        "requests": [_request_record(r) for r in plan.requests],
        "invalid": [list(dataclasses.astuple(r)) for r in plan.invalid],
    }
    arrays = {"tokens": plan.tokens.tokens, "token_indptr": plan.tokens.indptr}
    arrays |= {f"layout.{f.name}": getattr(plan.layout, f.name) for f in dataclasses.fields(plan.layout)
               if isinstance(getattr(plan.layout, f.name), np.ndarray)}
    write_container(path, {"plan": plan.header.to_json(), "layout": layout_numbers(plan.layout)}, records, arrays)


def load_plan(path: Path) -> Plan:
    """The plan at `path`, its arrays memory-mapped; UserError when it is not a plan of this format, or when
    any byte of it changed (checksums) or its parts do not fit together (plan_integrity)."""
    header, base = read_header(path)
    records = read_records(path, header, base)
    arrays = read_arrays(path, header, base)
    with _damaged_if_malformed(path):
        layout_fields = {f.name: arrays.get(f"layout.{f.name}", header["layout"].get(f.name))
                         for f in dataclasses.fields(PlanLayout)}
        plan = Plan(
            header=PlanHeader.from_json(header["plan"]),
            requests=[request_from_record(r) for r in records["requests"]],
            invalid=[invalid_from_record(r) for r in records["invalid"]],
            tokens=TokenTable(arrays["tokens"], arrays["token_indptr"]),
            layout=PlanLayout(**layout_fields),
        )
        check_layout(plan)
        return plan


def load_plan_header(path: Path) -> PlanHeader:
    """The header alone (fast; its checksum verified): for checks and summaries that need no arrays."""
    header, _ = read_header(path)
    with _damaged_if_malformed(path):
        return PlanHeader.from_json(header["plan"])


@contextmanager
def _damaged_if_malformed(path: Path) -> Iterator[None]:
    """A plan whose parts do not fit together (damaged, or written by another batchrun) is a UserError."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AssertionError, IndexError) as e:
        raise damaged(path, f"{type(e).__name__}: {e}, or it was made by another version of batchrun") from None


def _request_record(r: Request) -> list[Any]:
    return [*(getattr(r, name) for name in _REQUEST_FIELDS),
            *(getattr(r.sampling, name) for name in _SAMPLING_FIELDS)]


# -- the container ----------------------------------------------------------------------------------------------


def write_container(path: Path, header: dict[str, Any], records: Any, arrays: dict[str, np.ndarray]) -> None:
    """Writes header + records + arrays atomically to `path`: every section's digest goes into the header,
    and the header's own digest follows it, so that no byte of the file can change unnoticed."""
    blob = orjson.dumps(records)
    sections: list[tuple[str, bytes | np.ndarray]] = [("records", blob)]
    sections += [(name, np.ascontiguousarray(a)) for name, a in arrays.items()]
    table: dict[str, Any] = {}
    offset = 0
    for name, data in sections:
        offset = _aligned(offset)
        raw = data if isinstance(data, bytes) else memoryview(data).cast("B")  # no copy of the array
        entry: dict[str, Any] = {"offset": offset, "nbytes": len(raw), "digest": _digest(raw)}
        if isinstance(data, np.ndarray):
            entry |= {"dtype": data.dtype.str, "shape": list(data.shape)}
        table[name] = entry
        offset += len(raw)
    head = orjson.dumps({**header, "format_version": FORMAT_VERSION, "sections": table})
    base = _aligned(len(MAGIC) + 8 + len(head) + DIGEST_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(head)) + head + bytes.fromhex(_digest(head)))
            for name, data in sections:
                f.seek(base + table[name]["offset"])
                f.write(data if isinstance(data, bytes) else memoryview(data).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None  # the plan's name, not the temporary file's
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header (its digest verified) and the file offset where sections start; UserError when `path` is
    not a plan of this format."""
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(f"{path}: not a batchrun plan (not a regular file)")
            size = os.fstat(f.fileno()).st_size
            if f.read(len(MAGIC)) != MAGIC:
                raise UserError(f"{path}: not a batchrun plan (make one with `batchrun plan INPUT.jsonl`)")
            (length,) = struct.unpack("<Q", f.read(8))
            if len(MAGIC) + 8 + length + DIGEST_SIZE > size:
                raise damaged(path, "it is truncated")
            head = f.read(length)
            digest = f.read(DIGEST_SIZE).hex()
    except FileNotFoundError:
        raise UserError(f"{path}: no such plan file") from None
    except struct.error:
        raise damaged(path, "it is truncated") from None
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError:
        raise damaged(path, "its header is not JSON") from None
    version = header.get("format_version") if isinstance(header, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: plan format {version} is not supported by this batchrun "
                        f"(it reads format {FORMAT_VERSION}); make the plan again with `batchrun plan`")
    if digest != _digest(head):
        raise damaged(path, "its header does not match its checksum")
    check_sections(path, header, base=_aligned(len(MAGIC) + 8 + length + DIGEST_SIZE), size=size)
    return header, _aligned(len(MAGIC) + 8 + length + DIGEST_SIZE)


def read_records(path: Path, header: dict[str, Any], base: int) -> Any:
    data = _read_section(path, header["sections"]["records"], base)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise damaged(path, "its records are not JSON") from None


def read_arrays(path: Path, header: dict[str, Any], base: int) -> dict[str, np.ndarray]:
    """Every array section, its digest verified, memory-mapped read-only (zero-length arrays are plain
    empty arrays)."""
    arrays = {}
    for name, entry in header["sections"].items():
        if "dtype" not in entry:
            continue
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        if entry["nbytes"] == 0:
            arrays[name] = np.zeros(shape, dtype=dtype)
            continue
        array = np.memmap(path, dtype=dtype, mode="r", offset=base + entry["offset"], shape=shape)
        if _digest(memoryview(array).cast("B")) != entry["digest"]:
            raise damaged(path, f"section {name!r} does not match its checksum")
        arrays[name] = array
    return arrays


def check_sections(path: Path, header: dict[str, Any], *, base: int, size: int) -> None:
    """Every section entry well formed, inside the file, and of a dtype the plan writes (never an object
    dtype, which numpy would dereference); UserError naming the section otherwise."""
    sections = header.get("sections")
    if not isinstance(sections, dict) or not isinstance(sections.get("records"), dict):
        raise damaged(path, "its header has no section table")
    for name, entry in sections.items():
        if not isinstance(entry, dict) or not all(_is_count(entry.get(k)) for k in ("offset", "nbytes")) \
                or not isinstance(entry.get("digest"), str):
            raise damaged(path, f"section {name!r} has a malformed entry")
        if base + entry["offset"] + entry["nbytes"] > size:
            raise damaged(path, f"it is truncated (section {name!r} ends past the end of the file)")
        if name != "records":
            _check_array_entry(path, name, entry)


def damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path}: the plan file is damaged: {why} (make it again with batchrun plan)")


def _check_array_entry(path: Path, name: str, entry: dict[str, Any]) -> None:
    shape = entry.get("shape")
    if entry.get("dtype") not in ARRAY_DTYPES:
        raise damaged(path, f"section {name!r} has dtype {entry.get('dtype')!r} "
                            f"(a plan holds only {', '.join(ARRAY_DTYPES)})")
    if not isinstance(shape, list) or len(shape) != 1 or not _is_count(shape[0]):
        raise damaged(path, f"section {name!r} has shape {shape!r} (a plan holds only flat arrays)")
    if shape[0] * np.dtype(entry["dtype"]).itemsize != entry["nbytes"]:
        raise damaged(path, f"section {name!r}: its shape and its size disagree")


def _read_section(path: Path, entry: dict[str, Any], base: int) -> bytes:
    with path.open("rb") as f:
        f.seek(base + entry["offset"])
        data = f.read(entry["nbytes"])
    if len(data) != entry["nbytes"]:
        raise damaged(path, "it is truncated")
    if _digest(data) != entry["digest"]:
        raise damaged(path, "its records do not match their checksum")
    return data


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest()


def _starts_with_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN
