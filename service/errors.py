"""One error shape for every 4xx: ``{"error": {"field": ..., "message": ...}}``.

Handlers in ``service.app`` turn ``ApiError``, request-validation errors and the library's named
errors into this shape, so a client can always tell which field was wrong.
"""
from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    field: str | None = Field(None, description="the request field at fault, dotted "
                              "(e.g. 'config.batch_size', 'query.limit'); null when none is")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An error with an HTTP status that names the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


# Documented on every route so that the OpenAPI spec lists the error shape, not FastAPI's default.
def error_responses(*codes: int) -> dict[int | str, dict]:
    text = {400: "bad request (field named)", 401: "no API key", 403: "wrong API key or path "
            "outside the data root", 404: "unknown resource", 409: "conflict with the job's "
            "state", 406: "unsupported Accept", 413: "request body over max_body_bytes",
            422: "invalid body or parameters, or a plan over the service's limits (field "
            "named)", 503: "job registry unavailable: retry (Retry-After)"}
    return {c: {"model": ErrorResponse, "description": text.get(c, "error")} for c in codes}
