"""Dataset references: paths under the data root (or fsspec URLs, when enabled) — nothing else.

A job names its embeddings with ``b3mine.config.EmbeddingSource`` whose ``path``/``target_path``/
``ids_path`` are relative to ``Settings.data_root`` (absolute paths are accepted only if they lie
under it). Each path is canonicalised with ``Path.resolve`` — which follows symlinks — and refused
with 403 unless the result is still under the root, so ``../``, absolute paths elsewhere and
symlinks pointing out of the root all fail the same way. A directory is walked and every file
in it is checked the same way after resolution (a symlinked file inside an allowed directory
is refused), at submission and again in the worker just before mining.
Names longer than the filesystem allows (a component over 255 bytes, a path over PATH_MAX)
are refused with 400 before the filesystem sees them.
"""
from __future__ import annotations

import hashlib
import json
import os
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


NAME_MAX = 255  # bytes in one path component (ext4, xfs, APFS...)
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096


def _check_lengths(value: str, field: str, root: Path) -> None:
    for part in Path(value).parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise ApiError(400, f"a path component is longer than {NAME_MAX} bytes", field)
    if len(str(root / value).encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise ApiError(400, f"path is longer than PATH_MAX ({PATH_MAX} bytes)", field)


def resolve_path(value: str, field: str, settings: Settings) -> Path:
    """The canonical local path of ``value`` under the data root, or an ApiError naming ``field``.
    A directory's files are checked too (`check_files_under_root`)."""
    if "\0" in value:
        raise ApiError(400, "path contains a NUL byte", field)
    if not value.strip():
        raise ApiError(400, "path is empty", field)
    root = settings.data_root
    _check_lengths(value, field, root)
    try:
        candidate = Path(value)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise ApiError(403, "path is outside the data root", field)
        if not resolved.exists():
            raise ApiError(400, "no such file or directory under the data root", field)
        check_files_under_root(resolved, root, field)
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, over-long names
        raise ApiError(400, f"invalid path: {exc.strerror or type(exc).__name__}"
                       if isinstance(exc, OSError) else f"invalid path: {exc}", field) from exc
    return resolved


def check_files_under_root(path: Path, root: Path, field: str) -> None:
    """Every file that reading ``path`` can open, resolved, lies under ``root`` (else 403)."""
    files = path.rglob("*") if path.is_dir() else [path]
    for f in files:
        real = f.resolve()
        if not real.is_relative_to(root):
            rel = f.relative_to(root) if f.is_relative_to(root) else f.name
            raise ApiError(403, f"{rel} resolves outside the data root (symlink)", field)


def check_source_under_root(source: EmbeddingSource, settings: Settings) -> None:
    """Re-check a stored (root-relative) source just before it is read: a symlink planted
    after submission is refused too."""
    for name in PATH_FIELDS:
        value = getattr(source, name)
        if value is not None and not is_url(value):
            resolve_path(value, f"dataset.{name}", settings)


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


def relative_paths(text: str, settings: Settings) -> str:
    """``text`` with the server's absolute directories written relative to the data root
    (error messages reach clients: they must not map the server's filesystem)."""
    for base, name in ((settings.plans, "plans"), (settings.cache, ".cache")):
        if not base.is_relative_to(settings.data_root):
            text = text.replace(str(base), f"<{name}>")
    text = text.replace(f"{settings.data_root}/", "")
    return text.replace(str(settings.data_root), ".")


def dataset_key(source: EmbeddingSource) -> str:
    return json.dumps(source.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
