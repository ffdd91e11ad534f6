"""Digests of weight files' content, cached in the user's cache folder by (path, size, mtime_ns), so that a
model of many gigabytes is read once to fingerprint it, not at every plan and run.

A file rewritten in place gets a new mtime (and usually size), so its digest is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 24
CACHE_NAME = "weight-digests.json"


def weights_digest(path: Path) -> str:
    """blake2b (128-bit) of the file's bytes, from the cache when the file's size and mtime are unchanged."""
    st = path.stat()
    key = str(path.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    cache = _read_cache()
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("digest"), str):
        return entry["digest"]
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    cache[key] = {"stamp": stamp, "digest": digest}
    _write_cache(cache)
    return digest


def cache_path() -> Path:
    """$BATCHRUN_CACHE_DIR, else $XDG_CACHE_HOME/batchrun, else ~/.cache/batchrun."""
    if "BATCHRUN_CACHE_DIR" in os.environ:
        return Path(os.environ["BATCHRUN_CACHE_DIR"]) / CACHE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchrun" / CACHE_NAME


def _read_cache() -> dict:
    try:
        cache = json.loads(cache_path().read_bytes())
    except (OSError, ValueError):
        return {}  # missing, unreadable or damaged: a cache is only ever a shortcut
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict) -> None:
    """Atomically (a temporary file renamed over it); a cache that cannot be written is skipped."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError:
        return  # a read-only home: the digest is computed again next time, nothing is wrong
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # a full disk: as above
