"""Dataset references: paths under the data root (or fsspec URLs, when enabled) — nothing else.

A job names its embeddings with ``b3mine.config.EmbeddingSource`` whose ``path``/``target_path``/
``ids_path`` are relative to ``Settings.data_root`` (absolute paths are accepted only if they lie
under it). Each path is canonicalised with ``Path.resolve`` — which follows symlinks — and refused
with 403 unless the result is still under the root, so ``../``, absolute paths elsewhere and
symlinks pointing out of the root all fail the same way.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from b3mine.config import EmbeddingSource

from service.errors import ApiError
from service.settings import Settings

PATH_FIELDS = ("path", "target_path", "ids_path")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(value: str) -> bool:
    return bool(_SCHEME.match(value)) or "::" in value


def _check_url(value: str, field: str, settings: Settings) -> str:
    if not settings.allow_fsspec:
        raise ApiError(400, "URL dataset references are disabled (set B3MINE_ALLOW_FSSPEC)", field)
    match = _SCHEME.match(value)
    # Chained URLs ("simplecache::file://...") could smuggle a local path past the scheme check.
    if match is None or "::" in value or match.group(1).lower() not in settings.fsspec_protocols:
        raise ApiError(403, f"URL scheme not allowed; allowed: {settings.fsspec_protocols}", field)
    return value


def resolve_path(value: str, field: str, settings: Settings) -> Path:
    """The canonical local path of ``value`` under the data root, or an ApiError naming ``field``."""
    if "\0" in value:
        raise ApiError(400, "path contains a NUL byte", field)
    if not value.strip():
        raise ApiError(400, "path is empty", field)
    root = settings.data_root
    try:
        candidate = Path(value)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, over-long names
        raise ApiError(400, f"invalid path: {exc}", field) from exc
    if not resolved.is_relative_to(root):
        raise ApiError(403, "path is outside the data root", field)
    if not resolved.exists():
        raise ApiError(400, "no such file or directory under the data root", field)
    return resolved


def normalise_source(source: EmbeddingSource, settings: Settings) -> EmbeddingSource:
    """Validate every path of ``source``; return it with paths relative to the data root.

    Root-relative paths are what the registry stores, so moving the data root (e.g. a new volume
    mount point) keeps the job ids and the stored jobs valid.
    """
    update: dict[str, str] = {}
    for name in PATH_FIELDS:
        value = getattr(source, name)
        if value is None:
            continue
        field = f"body.dataset.{name}"
        if is_url(value):
            update[name] = _check_url(value, field, settings)
        else:
            update[name] = resolve_path(value, field, settings).relative_to(
                settings.data_root).as_posix()
    return source.model_copy(update=update)


def absolute_source(source: EmbeddingSource, settings: Settings) -> EmbeddingSource:
    """The stored (root-relative) source with local paths made absolute for the engine."""
    update = {name: str(settings.data_root / getattr(source, name)) for name in PATH_FIELDS
              if getattr(source, name) is not None and not is_url(getattr(source, name))}
    return source.model_copy(update=update)


def source_fingerprint(source: EmbeddingSource, settings: Settings) -> str:
    """Size and mtime of the local inputs: a file replaced in place gets a new job id.

    The plan id itself is a content hash (computed by the engine after loading); this cheap
    stat-based stamp only keeps a resubmission from returning a job mined from older bytes.
    """
    parts = []
    for name in PATH_FIELDS:
        value = getattr(source, name)
        if value is None or is_url(value):
            continue
        path = settings.data_root / value
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            parts.append(f"{f.relative_to(settings.data_root).as_posix()}:{st.st_size}:"
                         f"{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def dataset_key(source: EmbeddingSource) -> str:
    return json.dumps(source.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
