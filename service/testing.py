"""Run the real app under a real uvicorn on 127.0.0.1 — for tests and benchmarks.

>>> with UvicornThread(create_app(settings)) as server:           # doctest: +SKIP
...     httpx.get(f"{server.url}/healthz")
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UvicornThread:
    """``uvicorn.Server`` in a daemon thread; stopping it runs the app's lifespan shutdown."""

    def __init__(self, app: Any, port: int | None = None, **config: Any) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False,
                                                    lifespan="on", **config))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 20.0) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError("uvicorn did not stop")

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def populate_data_root(root: Any, corpus: Any, plans: Any = ()) -> None:
    """Copy a corpus to ``root/corpora/`` and plan directories to ``root/plans/``.

    Tests serve copies so the session-scoped originals stay untouched.
    """
    import shutil
    from pathlib import Path

    root = Path(root)
    (root / "corpora").mkdir(parents=True, exist_ok=True)
    shutil.copy2(corpus, root / "corpora" / Path(corpus).name)
    for plan_dir in plans:
        plan_dir = Path(plan_dir)
        shutil.copytree(plan_dir, root / "plans" / plan_dir.name, dirs_exist_ok=True)
