"""``b3mine serve``: run the REST service under uvicorn.

Registered in the ``b3mine.commands`` entry-point group; options override the ``B3MINE_*``
environment (they are passed on to the uvicorn workers through it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def serve(
    host: Annotated[str, typer.Option(help="interface to bind (0.0.0.0 in a container)")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    data_root: Annotated[Optional[Path], typer.Option(
        help="datasets, plans and the job database live here (env B3MINE_DATA_ROOT)")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes (they share the "
                                         "SQLite job registry)")] = 1,
    engine: Annotated[Optional[str], typer.Option(help="local | dask (env B3MINE_ENGINE)")
                      ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve batch plans and mining jobs over REST (FastAPI under uvicorn)."""
    import uvicorn

    if data_root is not None:
        os.environ["B3MINE_DATA_ROOT"] = str(data_root)
    if engine is not None:
        os.environ["B3MINE_ENGINE"] = engine
    from service.settings import Settings

    Settings()  # fail fast on a bad environment, before forking workers
    uvicorn.run("service.app:create_app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level=log_level, access_log=False)
