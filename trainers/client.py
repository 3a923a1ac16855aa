"""`PlanClient`: a plan served by the b3mine REST service, as a `PlanSource`.

One request per epoch: ``GET /v1/plans/{id}/epochs/{e}/batches`` with
``Accept: application/vnd.apache.arrow.stream`` returns the whole epoch as an Arrow IPC stream,
decoded record batch by record batch while it arrives. The manifest comes from
``GET /v1/plans/{id}``. Plans are immutable, so:

* decoded epochs stay in a small in-memory LRU and are not asked for again;
* with ``cache_dir`` the raw responses are kept on disk with their ETags, and a restarted trainer
  revalidates them with ``If-None-Match`` (a ``304`` costs no body).

Connection errors, timeouts, cut-off streams and 5xx answers are retried with exponential
backoff and jitter (honouring ``Retry-After``); when the retries are spent the client raises
`PlanServiceUnavailable` naming the URL and the last error. 4xx answers are not retried: they
raise `PlanServiceError` with the service's message.

>>> from trainers.client import PlanClient
>>> plan = PlanClient("http://plans.internal:8000", "0123456789abcdef", api_key="...")  # doctest: +SKIP
>>> plan.epoch_table(0).num_rows                                                      # doctest: +SKIP
1920
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from b3mine.errors import B3MineError
from b3mine.plan import PlanManifest, PlanShape
from trainers.plans import (
    check_epoch,
    check_epoch_table,
    empty_negatives,
    negatives_by_position,
)

ARROW_STREAM = "application/vnd.apache.arrow.stream"
API_KEY_ENV = "B3MINE_API_KEY"
RETRY_STATUS = frozenset({500, 502, 503, 504})


class PlanServiceError(B3MineError):
    """The service answered with an error that retrying will not fix (4xx)."""

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None) -> None:
        super().__init__(message)
        self.status, self.url = status, url


class PlanServiceUnavailable(PlanServiceError, ConnectionError):
    """The service could not be reached, or kept failing, after every retry."""


class _Retry(Exception):
    """Internal: this attempt failed in a way worth another try."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks, copying each chunk to ``sink`` too:
    pyarrow decodes the stream while it arrives and the disk cache fills in the same pass."""

    def __init__(self, chunks: Iterator[bytes], sink: io.BufferedWriter | None = None) -> None:
        self._chunks, self._sink = chunks, sink
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not len(self._buf):
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return 0
            if self._sink is not None:
                self._sink.write(chunk)
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _server_message(response: Any) -> str:
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(err, dict) and "message" in err:
            field = f" (field {err['field']})" if err.get("field") else ""
            return f"{err['message']}{field}"
        return str(body)[:300]
    except Exception:  # noqa: BLE001 - any body at all is better than none in an error message
        return response.text[:300] if hasattr(response, "text") else ""


class PlanClient(PlanShape):
    """A served plan, read over HTTP; the same interface as `trainers.plans.LocalPlan`.

    Args:
        base_url: the service root, e.g. ``http://localhost:8000``.
        plan_id: the plan to read.
        api_key: sent as ``X-API-Key``; defaults to ``$B3MINE_API_KEY``.
        timeout: seconds per connect/read.
        retries: further attempts after a failed one (connection errors, 5xx, cut streams).
        backoff, max_backoff: the first retry waits about ``backoff`` seconds, doubling up to
            ``max_backoff`` (full jitter: a random fraction, so ranks do not retry in lockstep).
        cache_dir: keep responses and ETags here for revalidation across restarts.
        memory_epochs: decoded epochs kept in memory.
        transport: an httpx transport (e.g. ``httpx.HTTPTransport(uds=...)``).
    """

    def __init__(self, base_url: str, plan_id: str, *, api_key: str | None = None,
                 timeout: float = 30.0, retries: int = 5, backoff: float = 0.25,
                 max_backoff: float = 8.0, cache_dir: str | Path | None = None,
                 memory_epochs: int = 2, transport: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._plan_id = plan_id
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout, self.retries = timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_epochs = memory_epochs
        self._transport = transport
        self._http: Any = None
        self._manifest: PlanManifest | None = None
        self._epochs: OrderedDict[int, pa.Table] = OrderedDict()
        self.stats = {"requests": 0, "retries": 0, "not_modified": 0}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PlanClient:
        """``http://host:port[/prefix]/v1/plans/<plan_id>`` -> a client for that plan."""
        parts = urlsplit(url)
        path = parts.path.rstrip("/")
        marker = "/v1/plans/"
        if marker not in path or not path.split(marker, 1)[1] or "/" in path.split(marker, 1)[1]:
            raise ValueError(f"not a plan URL: {url!r} (expected http://host/v1/plans/<plan_id>)")
        prefix, plan_id = path.split(marker, 1)
        return cls(f"{parts.scheme}://{parts.netloc}{prefix}", plan_id, **kwargs)

    def __repr__(self) -> str:
        return f"PlanClient({self.base_url!r}, {self._plan_id!r})"

    # A client crosses process boundaries (spawned workers, pickled samplers) as its settings:
    # sockets and decoded epochs are per process.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_http=None, _epochs=OrderedDict(), _transport=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> PlanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ----------------------------------------------------------------------------------
    @property
    def http(self) -> Any:
        if self._http is None:
            import httpx  # optional dependency: only clients of the service need it

            headers = {"User-Agent": "b3mine-trainers"}
            if self.api_key:
                headers["X-API-Key"] = self.api_key
            self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                      timeout=self.timeout, transport=self._transport)
        return self._http

    def _cache_paths(self, url: str, accept: str) -> tuple[Path, Path] | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{self.base_url}{url}\0{accept}".encode()).hexdigest()[:32]
        return self.cache_dir / f"{key}.body", self.cache_dir / f"{key}.etag"

    def _get(self, url: str, *, accept: str, params: dict[str, Any] | None = None) -> pa.Table | bytes:
        """GET with retries and ETag revalidation; Arrow bodies come back decoded."""
        import httpx

        cache = self._cache_paths(url, accept)
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                self.stats["retries"] += 1
            headers = {"Accept": accept}
            if cache and cache[0].is_file() and cache[1].is_file():
                headers["If-None-Match"] = cache[1].read_text()
            try:
                self.stats["requests"] += 1
                return self._attempt(url, headers, params, accept, cache)
            except _Retry as exc:
                last, wait = str(exc), exc.retry_after
            except (httpx.TransportError, pa.ArrowInvalid, OSError) as exc:
                # TransportError: refused, reset, timeout, cut stream; ArrowInvalid: a stream
                # that ended mid-message (the server or a proxy went away while sending).
                last, wait = f"{type(exc).__name__}: {exc}", None
            if attempt + 1 < attempts:
                cap = min(self.max_backoff, self.backoff * 2 ** attempt)
                time.sleep(wait if wait is not None else random.uniform(cap / 2, cap))
        raise PlanServiceUnavailable(
            f"plan service at {self.base_url} unreachable: GET {url} failed {attempts} time(s); "
            f"last error: {last}. Is the service running (b3mine serve) and the URL right?",
            url=f"{self.base_url}{url}",
        )

    def _attempt(self, url: str, headers: dict[str, str], params: dict[str, Any] | None,
                 accept: str, cache: tuple[Path, Path] | None) -> pa.Table | bytes:
        request = self.http.build_request("GET", url, headers=headers, params=params)
        response = self.http.send(request, stream=True)
        try:
            if response.status_code == 304 and cache is not None:
                self.stats["not_modified"] += 1
                return self._decode(cache[0].read_bytes(), accept)
            if response.status_code in RETRY_STATUS or response.status_code == 429:
                response.read()
                after = response.headers.get("Retry-After")
                raise _Retry(f"HTTP {response.status_code}: {_server_message(response)}",
                             float(after) if after and after.isdigit() else None)
            if response.status_code >= 400:
                response.read()
                hint = ""
                if response.status_code in (401, 403):
                    hint = f" (pass api_key= or set ${API_KEY_ENV})"
                raise PlanServiceError(
                    f"GET {self.base_url}{url}: HTTP {response.status_code}: "
                    f"{_server_message(response)}{hint}",
                    status=response.status_code, url=f"{self.base_url}{url}",
                )
            ctype = response.headers.get("content-type", "").split(";")[0].strip()
            if ctype != accept:
                response.read()
                raise PlanServiceError(f"GET {self.base_url}{url}: expected {accept}, the "
                                       f"service sent {ctype or 'no content type'}",
                                       status=response.status_code)
            return self._receive(response, accept, cache)
        finally:
            response.close()

    def _receive(self, response: Any, accept: str, cache: tuple[Path, Path] | None
                 ) -> pa.Table | bytes:
        tag = response.headers.get("ETag")
        tmp = None
        sink = None
        if cache is not None and tag:
            cache[0].parent.mkdir(parents=True, exist_ok=True)
            tmp = cache[0].with_name(f".{cache[0].name}.{uuid.uuid4().hex[:8]}.tmp")
            sink = open(tmp, "wb")
        try:
            if accept == ARROW_STREAM:
                reader = io.BufferedReader(_ChunkReader(response.iter_bytes(), sink), 1 << 16)
                result: pa.Table | bytes = ipc.open_stream(reader).read_all()
                reader.read()  # drain: the sink must hold the whole body, end marker included
            else:
                result = response.read()
                if sink is not None:
                    sink.write(result)
            if sink is not None and tmp is not None and cache is not None:
                sink.close()
                os.replace(tmp, cache[0])  # body first: an ETag never names a missing body
                cache[1].write_text(tag)
            return result
        finally:
            if sink is not None:
                sink.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _decode(body: bytes, accept: str) -> pa.Table | bytes:
        if accept == ARROW_STREAM:
            return ipc.open_stream(pa.BufferReader(body)).read_all()
        return body

    # -- PlanSource ----------------------------------------------------------------------------
    @property
    def plan_id(self) -> str:
        return self._plan_id

    @property
    def manifest(self) -> PlanManifest:
        if self._manifest is None:
            body = self._get(f"/v1/plans/{self._plan_id}", accept="application/json")
            import json

            data = json.loads(body)
            if isinstance(data, dict) and "manifest" in data and "plan_id" not in data:
                data = data["manifest"]
            try:
                self._manifest = PlanManifest.model_validate(data)
            except ValueError as exc:
                raise PlanServiceError(f"{self.base_url}/v1/plans/{self._plan_id}: not a plan "
                                       f"manifest: {exc}") from exc
        return self._manifest

    def epoch_table(self, epoch: int) -> pa.Table:
        check_epoch(self, epoch)
        table = self._epochs.get(epoch)
        if table is None:
            url = f"/v1/plans/{self._plan_id}/epochs/{epoch}/batches"
            got = self._get(url, accept=ARROW_STREAM)
            assert isinstance(got, pa.Table)
            if "epoch" not in got.column_names:  # the stream is one epoch: the column is implied
                got = got.add_column(0, "epoch", pa.array(
                    np.full(got.num_rows, epoch, dtype=np.int32)))
            table = check_epoch_table(self, epoch, got)
            self._epochs[epoch] = table
            while len(self._epochs) > max(self.memory_epochs, 1):
                self._epochs.popitem(last=False)
        else:
            self._epochs.move_to_end(epoch)
        return table

    def batch_negatives(self, epoch: int, batch: int) -> pa.Table:
        table = self.epoch_table(epoch)
        id_type = table.schema.field("id").type
        if "negatives" not in table.column_names:
            return empty_negatives(id_type)
        b = self.batch_size
        part = table.slice(batch * b, b)
        return negatives_by_position(part.column("negatives").combine_chunks(),
                                     part.column("negative_ids").combine_chunks())
