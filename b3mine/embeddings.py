"""Teacher embeddings in: Parquet or memory-mapped .npy, a single corpus or query/target pairs.

Every check names the file, column and row at fault. Loading never changes the input files.

>>> import numpy as np
>>> emb = Embeddings.from_arrays(np.arange(4), np.eye(4, dtype=np.float32))
>>> emb.n_rows, emb.dim, emb.paired
(4, 4, False)
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from b3mine.config import EmbeddingSource
from b3mine.errors import InputError


@dataclass(frozen=True)
class Embeddings:
    """Row-aligned ids and teacher vectors. ``targets is None`` means a single corpus."""

    ids: np.ndarray
    queries: np.ndarray
    targets: np.ndarray | None = None
    source: str = "<memory>"
    #: what errors call the query and target matrices: the file's columns (None for .npy)
    columns: tuple[str | None, str | None] = ("queries", "targets")

    @classmethod
    def from_arrays(
        cls,
        ids: np.ndarray | list,
        queries: np.ndarray,
        targets: np.ndarray | None = None,
        *,
        source: str = "<memory>",
        normalize: bool = False,
        columns: tuple[str | None, str | None] = ("queries", "targets"),
        unique_ids: bool = True,
    ) -> Embeddings:
        """Checked embeddings. ``unique_ids=False`` skips the uniqueness check, for a shard of
        a larger input whose ids are checked as a whole elsewhere (the Dask loader)."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iuUO":
            raise InputError("ids must be integers or strings", file=source, expected="int or str",
                             got=str(ids.dtype))
        if ids.dtype.kind == "O":
            ids = ids.astype(str)
        q = _check_matrix(queries, source, columns[0])
        t = None if targets is None else _check_matrix(targets, source, columns[1])
        emb = cls(ids=ids, queries=q, targets=t, source=source, columns=columns)
        emb._check_aligned(unique_ids)
        return emb.normalized() if normalize else emb

    @property
    def n_rows(self) -> int:
        return self.queries.shape[0]

    @property
    def dim(self) -> int:
        return self.queries.shape[1]

    @property
    def paired(self) -> bool:
        return self.targets is not None

    @property
    def target_matrix(self) -> np.ndarray:
        return self.queries if self.targets is None else self.targets

    def normalized(self) -> Embeddings:
        """L2-normalised copy (cosine similarity becomes inner product)."""
        return Embeddings(
            ids=self.ids,
            queries=_l2_normalize(self.queries, self.source, self.columns[0]),
            targets=None if self.targets is None else _l2_normalize(self.targets, self.source,
                                                                    self.columns[1]),
            source=self.source,
            columns=self.columns,
        )

    def fingerprint(self) -> str:
        """Content hash of ids and vectors: part of the plan id."""
        h = hashlib.blake2b(digest_size=16)
        h.update(str(self.ids.dtype.kind).encode())
        # In chunks, so memory-mapped ids are hashed in bounded memory; the bytes hashed are
        # those of the whole array (string ids joined by NUL), whatever the chunking.
        for start in range(0, len(self.ids), 65536):
            chunk = self.ids[start : start + 65536]
            if self.ids.dtype.kind in "iu":
                h.update(np.ascontiguousarray(chunk, dtype=np.int64).tobytes())
            else:
                h.update(("\0" if start else "").encode() + "\0".join(chunk.tolist()).encode())
        for m in (self.queries, self.targets):
            if m is not None:
                h.update(f"{m.shape}".encode())
                for start in range(0, m.shape[0], 65536):  # bounded memory on mmapped inputs
                    h.update(np.ascontiguousarray(m[start : start + 65536]).tobytes())
        return h.hexdigest()

    def _check_aligned(self, unique_ids: bool = True) -> None:
        n = self.queries.shape[0]
        if self.ids.ndim != 1 or len(self.ids) != n:
            raise InputError("ids are not aligned with the embeddings", file=self.source,
                             expected=f"{n} ids", got=f"{len(self.ids)}")
        if self.targets is not None and self.targets.shape != self.queries.shape:
            raise InputError("query and target embeddings differ in shape", file=self.source,
                             expected=str(self.queries.shape), got=str(self.targets.shape))
        if unique_ids:
            check_unique_ids(self.ids, self.source)


def _check_matrix(m: np.ndarray, source: str, column: str | None) -> np.ndarray:
    try:
        m = np.asarray(m)  # a memory map stays mapped: no copy
    except ValueError as exc:  # ragged nested lists
        raise InputError("embeddings are ragged (rows of different lengths)", file=source,
                         column=column, expected="rows of one dimension") from exc
    if m.ndim == 2 and m.shape[0] == 0:
        raise InputError("no rows: the input holds 0 embeddings", file=source, column=column,
                         expected=">= 1 row")
    if m.dtype.kind == "O":
        raise InputError("embeddings are ragged or not numeric", file=source, column=column,
                         expected="float32 rows of one dimension", got="object array")
    if m.ndim != 2 or m.shape[1] == 0:
        raise InputError("embeddings must be a 2-D matrix", file=source, column=column,
                         expected="shape (rows, dim>0)", got=str(m.shape))
    if m.dtype.kind != "f":
        raise InputError("embeddings must be floating point", file=source, column=column,
                         expected="float32", got=str(m.dtype))
    if m.dtype != np.float32:
        m = m.astype(np.float32)
    _check_finite(m, source, column)
    return m


def _check_finite(m: np.ndarray, source: str, column: str | None) -> None:
    for start in range(0, m.shape[0], 65536):
        block = m[start : start + 65536]
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise InputError("embedding holds a NaN or infinite value", file=source, column=column,
                             row=row, expected="finite floats")


def first_duplicate(ids: np.ndarray) -> tuple[Any, int, int] | None:
    """The smallest id that occurs more than once and the positions of its first two
    occurrences, or None when the ids are unique."""
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if not (counts > 1).any():
        return None
    value = ids[first[int(np.argmax(counts > 1))]]
    later = np.flatnonzero(ids == value)
    value = value.item() if isinstance(value, np.generic) else value
    return value, int(later[0]), int(later[1])


def duplicate_id_error(duplicate: tuple[Any, int, int], source: str) -> InputError:
    """The error for ``first_duplicate``'s answer (positions are rows of ``source``)."""
    value, first, second = duplicate
    return InputError(f"duplicate id {value!r}, first seen at row {first}", file=source,
                      row=second, expected="unique ids")


def check_unique_ids(ids: np.ndarray, source: str) -> None:
    """Raise `InputError` naming the file rows of the first duplicated id."""
    duplicate = first_duplicate(ids)
    if duplicate is not None:
        raise duplicate_id_error(duplicate, source)


def _l2_normalize(m: np.ndarray, source: str, column: str | None) -> np.ndarray:
    """Row-wise L2 normalisation in float64: float32 squares overflow past ~1e19 and vanish
    below ~1e-23, float64 ones never do for finite float32 values."""
    out = np.empty(m.shape, np.float32)
    for start in range(0, m.shape[0], 65536):
        block = np.asarray(m[start : start + 65536], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
        zero = norms[:, 0] == 0
        if zero.any():
            raise InputError("cannot L2-normalise a zero vector", file=source, column=column,
                             row=start + int(np.argmax(zero)), expected="non-zero norm")
        out[start : start + len(block)] = block / norms
    return out


# -- readers ---------------------------------------------------------------------------------

def source_columns(source: EmbeddingSource) -> tuple[str | None, str | None]:
    """The names errors give the query and target matrices of ``source``: its columns, or none
    for a .npy matrix (which has no columns; the error names the file)."""
    if Path(source.path).suffix == ".npy":
        return (None, None)
    return (source.column, source.target_column or source.column)


def load_embeddings(source: EmbeddingSource | str | Path, *, normalize: bool = False) -> Embeddings:
    """Read embeddings as ``source`` describes (a bare path means defaults: id + embedding)."""
    if not isinstance(source, EmbeddingSource):
        source = EmbeddingSource(path=str(source))
    path = Path(source.path)
    if not path.exists():
        raise InputError("no such file or directory", file=str(path))
    if path.suffix == ".npy":
        emb = _load_npy(source)
    else:
        emb = _load_parquet(source)
    return emb.normalized() if normalize else emb


def require_ids_path(source: EmbeddingSource) -> None:
    """`.npy` input carries no ids: refuse it without an aligned id file (both engines)."""
    if source.ids_path is None:
        raise InputError(".npy embeddings need an aligned id file (--ids-path; ids_path in "
                         "Python and in a job's source)", file=source.path)


def _load_npy(source: EmbeddingSource) -> Embeddings:
    path = Path(source.path)
    require_ids_path(source)
    queries = _open_npy(path)
    targets = _open_npy(Path(source.target_path)) if source.target_path else None
    ids = read_ids_file(Path(source.ids_path))
    return Embeddings.from_arrays(ids, queries, targets, source=str(path),
                                  columns=source_columns(source))


def _open_npy(path: Path) -> np.ndarray:
    return load_npy(path, mmap=True)


def read_ids_file(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError("no such id file", file=str(path))
    if path.suffix == ".npy":
        return load_npy(path, mmap=False)
    return np.array(list(id_lines(path)), dtype=str)


def id_lines(path: Path) -> Iterator[str]:
    """The ids of a text id file, one per line, read a line at a time (``str.splitlines``
    boundaries, as if the whole text were split)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield from line.splitlines()


def load_npy(path: Path, *, mmap: bool = True) -> np.ndarray:
    """``np.load`` without pickles (never executed), its errors as one named line."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        if any(s in str(exc) for s in ("allow_pickle", "Object arrays", "Python objects")):
            raise InputError("a pickled .npy (object array) is not accepted", file=str(path),
                             expected="a numeric (or, for ids, string/integer) array saved "
                             "without pickle") from exc
        raise InputError(f"cannot read .npy: {exc}", file=str(path)) from exc
    except OSError as exc:
        raise InputError(f"cannot read .npy: {exc}", file=str(path)) from exc


def parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
        if not files:
            raise InputError("directory holds no .parquet files", file=str(path))
        return files
    return [path]


def open_parquet(path: Path, columns: list[str]) -> pq.ParquetFile:
    """Open one Parquet file, checking it is readable and holds ``columns`` (named errors)."""
    try:
        meta = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable Parquet file: {exc}", file=str(path)) from exc
    names = meta.schema_arrow.names
    for col in columns:
        if col not in names:
            raise InputError("missing column", file=str(path), column=col,
                             expected=f"one of the columns {names}")
    return meta


def read_checked(path: Path | str, read: Callable[[], pa.Table]) -> pa.Table:
    """Run a Parquet read; a corrupt page (checksum mismatch, undecodable data) becomes one
    named line instead of Arrow's error from deep inside the reader."""
    try:
        return read()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"corrupt Parquet data: {exc}", file=str(path)) from exc


def _read_parquet(path: Path, columns: list[str]) -> pa.Table:
    tables = [read_checked(f, lambda f=f: open_parquet(f, columns).read(columns=columns))
              for f in parquet_files(path)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def vector_column(table: pa.Table, column: str, file: str) -> np.ndarray:
    """A list<float> / fixed_size_list<float>[d] column as an (n, d) float32 matrix, zero-copy
    where Arrow allows it."""
    col = table.column(column).combine_chunks()
    typ = col.type
    if pa.types.is_fixed_size_list(typ):
        d = typ.list_size
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        if col.null_count:
            raise InputError("null embedding", file=file, column=column,
                             row=int(np.argmax(col.is_null().to_numpy(zero_copy_only=False))))
        lengths = col.value_lengths().to_numpy()
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.argmax(lengths != lengths[0]))
            raise InputError("inconsistent embedding dimension", file=file, column=column, row=row,
                             expected=f"dimension {int(lengths[0])}", got=f"{int(lengths[row])}")
        d = int(lengths[0]) if len(lengths) else 0
    else:
        raise InputError("embedding column is not a list of floats", file=file, column=column,
                         expected="list<float32> or fixed_size_list<float32>[d]", got=str(typ))
    if col.null_count:
        raise InputError("null embedding", file=file, column=column,
                         row=int(np.argmax(col.is_null().to_numpy(zero_copy_only=False))))
    if not pa.types.is_floating(typ.value_type):
        raise InputError("embedding values are not floats", file=file, column=column,
                         expected="float32", got=str(typ.value_type))
    values = col.flatten()
    if values.null_count:
        flat = int(np.argmax(values.is_null().to_numpy(zero_copy_only=False)))
        raise InputError("null value inside an embedding", file=file, column=column,
                         row=flat // max(d, 1))
    arr = values.to_numpy(zero_copy_only=False)
    return arr.reshape(len(col), d) if d else arr.reshape(len(col), 0)


def _load_parquet(source: EmbeddingSource) -> Embeddings:
    path = Path(source.path)
    columns = [source.id_column, source.column]
    if source.target_column:
        columns.append(source.target_column)
    table = _read_parquet(path, columns)
    ids_col = table.column(source.id_column)
    if ids_col.null_count:
        row = int(np.argmax(ids_col.is_null().to_numpy(zero_copy_only=False)))
        raise InputError("null id", file=str(path), column=source.id_column, row=row)
    typ = ids_col.type
    if not (pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise InputError("id column must hold integers or strings", file=str(path),
                         column=source.id_column, expected="int or string", got=str(typ))
    ids = ids_col.to_numpy(zero_copy_only=False)
    queries = vector_column(table, source.column, str(path))
    targets = None
    if source.target_column:
        targets = vector_column(table, source.target_column, str(path))
    elif source.target_path:
        ttable = _read_parquet(Path(source.target_path), [source.id_column, source.column])
        tids = ttable.column(source.id_column).to_numpy(zero_copy_only=False)
        if len(tids) != len(ids) or (tids != ids).any():
            row = int(np.argmax(tids != ids)) if len(tids) == len(ids) else min(len(ids), len(tids))
            raise InputError("target file's ids are not aligned with the query file's",
                             file=source.target_path, column=source.id_column, row=row)
        targets = vector_column(ttable, source.column, source.target_path)
    for name, m in ((source.column, queries), (source.target_column or source.column, targets)):
        if m is not None and m.shape[1] == 0:
            raise InputError("empty embedding", file=str(path), column=name,
                             expected="dimension > 0", got="0")
    return Embeddings.from_arrays(ids, queries, targets, source=str(path),
                                  columns=source_columns(source))
