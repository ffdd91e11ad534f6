"""Ragged token ids for many requests as one flat int32 array and int64 offsets (no per-token objects)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenTable:
    tokens: np.ndarray  # int32 [T]
    indptr: np.ndarray  # int64 [R + 1]; request i is tokens[indptr[i]:indptr[i + 1]]

    def __post_init__(self) -> None:
        assert self.tokens.dtype == np.int32 and self.tokens.ndim == 1
        assert self.indptr.dtype == np.int64 and self.indptr.ndim == 1 and self.indptr[0] == 0
        assert self.indptr[-1] == len(self.tokens)

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.indptr[i] : self.indptr[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def from_lists(cls, seqs: Iterable[Iterable[int]]) -> TokenTable:
        arrays = [np.asarray(list(s), dtype=np.int32) for s in seqs]
        indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=indptr[1:])
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return cls(tokens=tokens.astype(np.int32, copy=False), indptr=indptr)
