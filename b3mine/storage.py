"""Object storage (fsspec URLs: ``s3://``, ``gs://``, ``file://``...) for inputs and plans.

The miners and readers work on local files (memory-mapped ``.npy`` and Parquet); this module
moves data between those files and a URL, keeping a plan atomic on stores that have no rename:

* **Inputs**: `fetch` copies a file or a directory of Parquet files to a local cache, keyed by
  the URL and the objects' sizes and ETags/mtimes (a changed object is fetched again).
* **Publishing a plan** (`publish_plan`): every file is uploaded under a temporary prefix
  ``<root>/.tmp-<plan_id>-<uuid>/``, copied to ``<root>/<plan_id>/`` and checked there; the
  manifest is written last. Until the manifest exists, no reader sees the plan.
* **Reading a plan** (`open_plan`): a reader opens a plan only when its manifest exists and every
  file it lists is present with the listed size; files are downloaded to a local cache, checked
  against the manifest's sha256, and opened as a `BatchPlan`.

Credentials and endpoints come from the usual places of each filesystem (for S3: the AWS
environment variables, e.g. ``AWS_ENDPOINT_URL`` for an S3-compatible server).

>>> is_url("s3://bucket/plans"), is_url("plans"), local_path("file:///tmp/x")
(True, False, PosixPath('/tmp/x'))
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from b3mine.errors import PlanError
from b3mine.plan import MANIFEST, sha256_file

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: str | Path) -> bool:
    """A URL of a remote filesystem (``file://`` URLs are local paths: see `local_path`)."""
    match = _SCHEME.match(str(path))
    return bool(match) and match.group(1).lower() not in ("file", "local")


def local_path(path: str | Path) -> Path:
    """``file://`` URLs and plain paths as a Path."""
    text = str(path)
    match = _SCHEME.match(text)
    if match and match.group(1).lower() in ("file", "local"):
        return Path(text[len(match.group(0)):] or "/")
    return Path(text)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as err:
        raise ImportError("object-storage URLs need fsspec (and e.g. s3fs): "
                          "pip install b3mine[storage]") from err
    return url_to_fs(url)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def default_cache() -> Path:
    """Where fetched inputs and plans are kept: ``$B3MINE_CACHE`` or ``~/.cache/b3mine``."""
    return Path(os.environ.get("B3MINE_CACHE") or Path.home() / ".cache" / "b3mine")


# -- inputs ----------------------------------------------------------------------------------

def fetch(url: str, cache: str | Path | None = None) -> Path:
    """A local copy of the file or directory at ``url`` (downloaded once, then reused)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url}: no such object or prefix")
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    stamp = hashlib.sha256(url.encode())
    for f in files:
        info = fs.info(f)
        stamp.update(f"\0{f}:{info.get('size')}:{info.get('ETag') or info.get('mtime')}".encode())
    root = Path(cache or default_cache()) / "inputs" / stamp.hexdigest()[:20]
    name = Path(path.rstrip("/")).name
    if not root.is_dir():  # renamed into place only once complete
        tmp = root.with_name(f".{root.name}.{uuid.uuid4().hex[:8]}.tmp")
        directory = fs.isdir(path)
        for f in files:
            dest = tmp / name / Path(f).relative_to(path.rstrip("/")) if directory else tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(dest))
        try:
            os.rename(tmp, root)
        except OSError:  # another process fetched the same objects first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return root / name


# -- plans -----------------------------------------------------------------------------------

def publish_plan(plan_dir: str | Path, root_url: str) -> str:
    """Upload a finished local plan to ``<root_url>/<plan_id>`` atomically; return its URL.

    A plan already published there (its manifest exists) is left as it is: plans are
    immutable and their id is a content hash.
    """
    plan_dir = Path(plan_dir)
    manifest = json.loads((plan_dir / MANIFEST).read_text())
    plan_id = manifest["plan_id"]
    fs, root = filesystem(root_url)
    final = join(root, plan_id)
    if fs.exists(join(final, MANIFEST)):
        return join(root_url, plan_id)
    tmp = join(root, f".tmp-{plan_id}-{uuid.uuid4().hex[:8]}")
    names = [p.name for p in sorted(plan_dir.iterdir()) if p.is_file() and p.name != MANIFEST]
    try:
        for name in names:
            fs.put_file(str(plan_dir / name), join(tmp, name))
        for name in names:
            fs.copy(join(tmp, name), join(final, name))
            if fs.size(join(final, name)) != (plan_dir / name).stat().st_size:
                raise OSError(f"{join(root_url, plan_id, name)}: upload is incomplete")
        fs.put_file(str(plan_dir / MANIFEST), join(final, MANIFEST))  # publishes the plan
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
    return join(root_url, plan_id)


def plan_manifest(url: str) -> dict[str, Any] | None:
    """The manifest of the plan at ``url`` when the plan is complete there, else None.

    Complete: the manifest exists and lists only files that exist with their listed sizes
    (size checks need ``file_sizes``, written by `b3mine.plan.write_plan`)."""
    fs, path = filesystem(url)
    try:
        with fs.open(join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    sizes = manifest.get("file_sizes") or {}
    for name in manifest.get("files", {}):
        try:
            size = fs.size(join(path, name))
        except FileNotFoundError:
            return None
        if name in sizes and size != sizes[name]:
            return None
    return manifest


def list_plan_ids(root_url: str) -> list[str]:
    """Ids of the complete plans under ``root_url``."""
    fs, root = filesystem(root_url)
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    ids = [Path(e.rstrip("/")).name for e in entries]
    return sorted(i for i in ids if not i.startswith(".")
                  and plan_manifest(join(root_url, i)) is not None)


def download_plan(url: str, cache: str | Path | None = None) -> Path:
    """A verified local copy of the complete plan at ``url`` (raises PlanError otherwise)."""
    manifest = plan_manifest(url)
    if manifest is None:
        raise PlanError(f"{url}: no complete plan there (manifest missing or its files "
                        "incomplete)")
    plan_id = manifest["plan_id"]
    target = Path(cache or default_cache()) / "plans" / plan_id
    if (target / MANIFEST).is_file():
        return target
    fs, path = filesystem(url)
    tmp = target.with_name(f".{plan_id}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        for name, digest in manifest["files"].items():
            fs.get_file(join(path, name), str(tmp / name))
            if sha256_file(tmp / name) != digest:
                raise PlanError(f"{join(url, name)}: content does not match the manifest hash")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks complete
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target



# -- what the engines call -------------------------------------------------------------------

def local_source(source: Any, cache: str | Path | None = None) -> Any:
    """The embeddings source with every URL replaced by a local copy (`fetch`) and every
    ``file://`` URL by its path; anything else is returned unchanged."""
    from b3mine.config import EmbeddingSource

    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        return str(fetch(value, cache)) if is_url(value) else str(local_path(value))

    if isinstance(source, EmbeddingSource):
        return source.model_copy(update={name: resolve(getattr(source, name))
                                         for name in ("path", "target_path", "ids_path")})
    if isinstance(source, (str, Path)):
        return Path(resolve(str(source)) or "")
    return source


def local_output(out: str | Path) -> tuple[Path, str | None]:
    """(local plan root the engines write to, the URL to publish to or None).

    For a URL, the local root is a staging directory in the cache, one per URL: it keeps the
    job records and a local copy of each plan, so a repeated job finds its plan at once."""
    if not is_url(out):
        return local_path(out), None
    url = str(out).rstrip("/")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return default_cache() / "outputs" / digest, url


def remote_plan(root_url: str, plan_id: str) -> str | None:
    """URL of a complete plan ``plan_id`` under ``root_url``, None if there is none."""
    url = join(root_url, plan_id)
    return url if plan_manifest(url) is not None else None
