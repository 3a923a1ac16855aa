"""Resource limits: the largest request body and the largest plan a job may ask for.

* ``max_body_bytes``: a body past it is refused with 413 before it is parsed — by its
  ``Content-Length``, or while it streams in when it has none (chunked).
* ``max_plan_rows`` (rows x epochs) and ``max_plan_bytes`` (an estimate of the Parquet written):
  a job over either is refused with 422 naming the limit, at submission, before any mining.
"""
from __future__ import annotations

import json
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from b3mine.config import EmbeddingSource, MiningConfig
from b3mine.embeddings import load_npy, open_parquet, parquet_files

from service.datasets import is_url
from service.errors import ApiError
from service.settings import Settings

# Uncompressed bytes per plan row per epoch in batches.parquet (epoch, batch, position: int32;
# row, id: int64; cluster: int32; padded: bool), and per extra negative (row + id, once).
ROW_BYTES = 33
NEGATIVE_BYTES = 16


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than this service's max_body_bytes "
                    f"({limit} bytes)", "body")


class BodyLimitMiddleware:
    """413 for a request body over ``limit`` bytes (pure ASGI: nothing is buffered here)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _send_413(send, self.limit)
                return
        seen, refused = 0, False

        async def counted() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.limit:  # answer now; the app sees the client go away
                    refused = True
                    await _send_413(send, self.limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:  # after a 413, whatever the app answers is dropped
                await send(message)

        await self.app(scope, counted, guarded)


async def _send_413(send: Send, limit: int) -> None:
    data = json.dumps(_too_large(limit).body()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def count_rows(source: EmbeddingSource, settings: Settings) -> int | None:
    """Rows of a local source from file metadata (no vector is read); None for URLs."""
    if is_url(source.path):
        return None
    path = settings.data_root / source.path
    if path.suffix == ".npy":
        return int(load_npy(path).shape[0])
    return sum(open_parquet(f, []).metadata.num_rows for f in parquet_files(Path(path)))


def check_plan_size(source: EmbeddingSource, config: MiningConfig, settings: Settings) -> None:
    """422 when the plan this job would write is over ``max_plan_rows`` or ``max_plan_bytes``."""
    n = count_rows(source, settings)
    if n is None:
        return
    cells = n * config.epochs
    if cells > settings.max_plan_rows:
        raise ApiError(422, f"the plan would hold {n} rows x {config.epochs} epochs = {cells} "
                       f"rows, over this service's max_plan_rows ({settings.max_plan_rows})",
                       "body.config.epochs")
    k = config.negatives.k if config.negatives.mode != "none" else 0
    estimate = cells * ROW_BYTES + n * k * NEGATIVE_BYTES
    if estimate > settings.max_plan_bytes:
        raise ApiError(422, f"the plan would write about {estimate} bytes, over this "
                       f"service's max_plan_bytes ({settings.max_plan_bytes})",
                       "body.config.epochs")
