"""API keys in the ``X-API-Key`` header: 401 without one, 403 with a wrong one.

Keys come from ``Settings.api_keys`` (``B3MINE_API_KEYS``). Writes always need a key — with no
key configured, writes are refused. Reads of jobs need one unless ``require_key_for_job_reads``
is switched off (a job shows its dataset paths, config and errors); reads of plans need one
when ``require_key_for_reads`` is set (plans are public by default).
Every configured key is compared with ``hmac.compare_digest`` (no early exit), so the timing does
not tell which key, or how much of one, matched.
"""
from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import APIKeyHeader

from service.errors import ApiError
from service.settings import Settings

FIELD = "header.X-API-Key"
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required for writes, and for reads when configured")


def key_ok(given: str, keys: list[bytes]) -> bool:
    candidate = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(candidate, key)
    return ok


Guard = Callable[..., Awaitable[None]]


def make_guards(settings: Settings) -> tuple[Guard, Guard, Guard]:
    """FastAPI dependencies ``(require_write, require_read, require_job_read)``."""
    keys = settings.key_values()

    def check(given: str | None) -> None:
        if not given:
            raise ApiError(401, "missing X-API-Key header", FIELD,
                           headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'})
        if not keys:
            raise ApiError(403, "no API keys are configured on this service "
                           "(B3MINE_API_KEYS): writes are disabled", FIELD)
        if not key_ok(given, keys):
            raise ApiError(403, "invalid API key", FIELD)

    async def require_write(key: str | None = Security(api_key_header)) -> None:
        check(key)

    async def require_read(key: str | None = Security(api_key_header)) -> None:
        check(key)

    async def open_read() -> None:
        """Reads are public: no security requirement, so the OpenAPI spec says so too."""

    return (require_write, require_read if settings.require_key_for_reads else open_read,
            require_read if settings.require_key_for_job_reads else open_read)
