"""Service settings, read from the environment (prefix ``B3MINE_``) by pydantic-settings.

>>> Settings(data_root="/srv/b3mine").plans_dir                       # doctest: +SKIP
PosixPath('/srv/b3mine/plans')

Every field can be set as ``B3MINE_<FIELD>``; ``B3MINE_API_KEYS`` takes a comma-separated list
(or a JSON list) so that keys can come from a secret file mounted as an env var.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service needs; derived paths default to files under ``data_root``."""

    model_config = SettingsConfigDict(env_prefix="B3MINE_", extra="ignore")

    data_root: Path = Field(Path(".b3mine/data"), description="dataset references resolve under "
                            "this directory; anything outside it is refused")
    plans_dir: Path | None = Field(None, description="where plans are written and served from "
                                   "(default: <data_root>/plans)")
    plans_url: str | None = Field(None, description="also serve the plans published under this "
                                  "fsspec URL (e.g. s3://bucket/plans; verified copies in "
                                  "cache_dir)")
    db_path: Path | None = Field(None, description="SQLite job registry "
                                 "(default: <data_root>/jobs.sqlite)")
    cache_dir: Path | None = Field(None, description="memory-mappable Arrow copies of epochs "
                                   "(default: <data_root>/.cache)")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted X-API-Key values; writes need one, and with "
        "none configured writes are disabled")
    require_key_for_reads: bool = Field(False, description="also require a key to read plans "
                                        "(GET /v1/plans...)")
    require_key_for_job_reads: bool = Field(True, description="require a key to read jobs "
                                            "(GET /v1/jobs...): they show dataset paths and "
                                            "errors")
    engine: Literal["local", "dask"] = Field("local", description="local: b3mine.mining in a "
                                             "child process per job; dask: the b3mine.engines "
                                             "plugin")
    mining_nice: int = Field(10, ge=0, le=19, description="CPU niceness of local mining "
                             "processes: serving keeps priority on shared cores")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="extra keyword "
                                           "arguments of the engine (dask: scheduler, workers)")
    job_workers: int = Field(1, ge=1, description="jobs mined concurrently per service process")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (413)")
    max_plan_rows: int = Field(100_000_000, ge=1, description="largest plan a job may ask "
                               "for, in rows x epochs (422)")
    max_plan_bytes: int = Field(4 << 30, ge=1, description="largest plan a job may ask for, "
                                "in estimated bytes written (422)")
    max_page: int = Field(1000, ge=1, description="most batches in one JSON page")
    default_page: int = Field(100, ge=1, description="batches in a JSON page without ?limit=")
    epoch_cache: int = Field(8, ge=1, description="memory-mapped epochs kept open (LRU)")
    batch_cache: int = Field(4096, ge=0, description="encoded single-batch responses kept (LRU)")
    allow_fsspec: bool = Field(False, description="accept fsspec URLs as dataset references")
    fsspec_protocols: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["s3", "gs", "gcs", "az", "abfs", "http", "https", "hf"],
        description="URL schemes accepted when allow_fsspec is on (never file:// or local://)")

    @field_validator("api_keys", "fsspec_protocols", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        # Env values arrive as one string: accept a JSON list or "a,b,c".
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        # Resolve once so that the traversal check compares canonical paths.
        root = self.data_root.expanduser().resolve()
        object.__setattr__(self, "data_root", root)
        object.__setattr__(self, "plans_dir", (self.plans_dir or root / "plans").resolve())
        object.__setattr__(self, "db_path", (self.db_path or root / "jobs.sqlite").resolve())
        object.__setattr__(self, "cache_dir", (self.cache_dir or root / ".cache").resolve())
        self.fsspec_protocols[:] = [p for p in self.fsspec_protocols if p not in ("file", "local")]
        return self

    @property
    def plans(self) -> Path:
        assert self.plans_dir is not None
        return self.plans_dir

    @property
    def db(self) -> Path:
        assert self.db_path is not None
        return self.db_path

    @property
    def cache(self) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir

    def key_values(self) -> list[bytes]:
        return [k.get_secret_value().encode() for k in self.api_keys]
