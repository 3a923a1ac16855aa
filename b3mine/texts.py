"""Text pairs in: Parquet, JSONL, CSV/TSV or a Hugging Face ``datasets`` folder.

The first stage of texts -> embeddings -> plan. `TextSource` says where the texts are and which
columns hold what; `read_texts` returns them as `TextPairs`, checked (a missing column, a null or
a non-string cell is one error naming the file, column and row).

Ids: the ``id`` column when the file has one (or the column ``id_column`` names). Without one,
ids are derived from the content, so they survive reordering and appending rows: the first 16
hex digits of ``sha256(query + "\\0" + target)``, and the n-th repeat (n >= 2) of an identical
pair gets the suffix ``~n``. Derived ids are strings.

>>> derive_ids(["q", "q"], ["t", "t"])[1].endswith("~2")
True
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from b3mine.config import FrozenConfig
from b3mine.embeddings import check_unique_ids
from b3mine.errors import InputError

TextFormat = Literal["auto", "parquet", "jsonl", "csv", "tsv", "datasets"]
_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".csv": "csv", ".tsv": "tsv"}


class TextSource(FrozenConfig):
    """Where the text pairs are and which columns hold what."""

    path: str
    query_column: str = Field("query", description="the query (anchor) text column")
    target_column: str | None = Field(
        "target", description="the target (positive) text column; None: a single corpus")
    id_column: str | None = Field(
        None, description="the id column; None: 'id' when present, else ids derived from the "
        "texts (see b3mine.texts)")
    split: str | None = Field(None, description="split of a saved DatasetDict (default: train)")
    format: TextFormat = "auto"


@dataclass(frozen=True)
class TextPairs:
    """Row-aligned ids and texts; ``targets is None`` means a single corpus."""

    ids: np.ndarray
    queries: list[str]
    targets: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def paired(self) -> bool:
        return self.targets is not None


def derive_ids(queries: list[str], targets: list[str] | None) -> np.ndarray:
    """Content ids (see the module doc): stable under reordering, unique under repeats."""
    seen: Counter[str] = Counter()
    out = []
    for i, q in enumerate(queries):
        text = q if targets is None else f"{q}\0{targets[i]}"
        base = hashlib.sha256(text.encode()).hexdigest()[:16]
        seen[base] += 1
        out.append(base if seen[base] == 1 else f"{base}~{seen[base]}")
    return np.array(out, dtype=str)


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_dict.json", "state.json",
                                               "dataset_info.json")):
            return "datasets"
        return "parquet"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError("cannot tell the text format from the file name", file=str(path),
                         expected="a .parquet, .jsonl, .csv or .tsv file, or a folder saved "
                         "with datasets' save_to_disk", got=path.suffix or "no suffix")
    return fmt


def read_table(source: TextSource) -> pa.Table:
    """The whole input as one Arrow table, whatever its format."""
    path = Path(source.path)
    if not path.exists():
        raise InputError("no such file or directory", file=str(path))
    fmt = detect_format(path) if source.format == "auto" else source.format
    try:
        if fmt == "parquet":
            files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith(".")) \
                if path.is_dir() else [path]
            if not files:
                raise InputError("directory holds no .parquet files", file=str(path))
            tables = [pq.read_table(f) for f in files]
            return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if fmt == "jsonl":
            import pyarrow.json as pj

            # blocks of 16 MiB: a line longer than a block cannot be parsed
            return pj.read_json(path, read_options=pj.ReadOptions(block_size=16 << 20))
        if fmt in ("csv", "tsv"):
            import pyarrow.csv as pc

            # text columns stay text even when a column happens to hold only numbers
            texts = [c for c in (source.query_column, source.target_column) if c]
            return pc.read_csv(path, parse_options=pc.ParseOptions(
                delimiter="\t" if fmt == "tsv" else ","), convert_options=pc.ConvertOptions(
                column_types={c: pa.string() for c in texts}))
        return _read_datasets(path, source.split)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"not a readable {fmt} file: {str(exc).splitlines()[0]}",
                         file=str(path)) from exc


def _read_datasets(path: Path, split: str | None) -> pa.Table:
    try:
        import datasets
    except ImportError as exc:
        raise InputError("reading a saved datasets folder needs the datasets package "
                         "(pip install 'b3mine[train]')", file=str(path)) from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise InputError(f"no split {name!r} in the saved DatasetDict", file=str(path),
                             expected=f"one of {sorted(ds)} (--split)")
        ds = ds[name]
    elif split is not None:
        raise InputError(f"split {split!r} given but the folder holds a single Dataset",
                         file=str(path))
    return ds.with_format("arrow")[:]  # honours a select/shuffle indices mapping


def _text_column(table: pa.Table, name: str, file: str, role: str) -> list[str]:
    if name not in table.column_names:
        raise InputError(f"missing {role} column", file=file, column=name,
                         expected=f"one of the columns {table.column_names}")
    col = table.column(name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputError(f"{role} column does not hold text", file=file, column=name,
                         expected="strings", got=str(col.type))
    if col.null_count:
        row = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise InputError(f"null {role} text", file=file, column=name, row=row)
    return col.to_pylist()


def _ids(table: pa.Table, source: TextSource, queries: list[str],
         targets: list[str] | None) -> np.ndarray:
    name = source.id_column or ("id" if "id" in table.column_names else None)
    if name is None:
        return derive_ids(queries, targets)
    if name not in table.column_names:
        raise InputError("missing id column", file=source.path, column=name,
                         expected=f"one of the columns {table.column_names}, or no --id-column "
                         "to derive ids from the texts")
    col = table.column(name)
    if col.null_count:
        row = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise InputError("null id", file=source.path, column=name, row=row)
    if pa.types.is_integer(col.type):
        return col.to_numpy().astype(np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.array(col.to_pylist(), dtype=str)
    raise InputError("id column must hold integers or strings", file=source.path, column=name,
                     expected="int or string", got=str(col.type))


def read_texts(source: TextSource | str | Path) -> TextPairs:
    """Read and check the text pairs ``source`` describes (a bare path: default columns)."""
    if not isinstance(source, TextSource):
        source = TextSource(path=str(source))
    table = read_table(source)
    queries = _text_column(table, source.query_column, source.path, "query")
    targets = None
    if source.target_column is not None:
        targets = _text_column(table, source.target_column, source.path, "target")
    ids = _ids(table, source, queries, targets)
    check_unique_ids(ids, source.path)
    return TextPairs(ids=ids, queries=queries, targets=targets, source=source.path)
