"""Shared benchmark helpers: synthetic embeddings, a peak-RSS sampler, JSON-lines output."""
from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


def two_level_mixture(n: int, d: int, coarse: int = 200, fine_per_coarse: int = 25,
                      seed: int = 0, spread: float = 0.6, noise: float = 0.5) -> np.ndarray:
    """Unit vectors from a two-level Gaussian mixture (topics with sub-topics), float32.

    Generated in blocks so that N=1M x d=768 does not need float64 intermediates of that size.
    """
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(coarse, d)).astype(np.float32)
    fine = (np.repeat(top, fine_per_coarse, axis=0)
            + spread * rng.normal(size=(coarse * fine_per_coarse, d)).astype(np.float32))
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        m = min(65536, n - start)
        x = fine[rng.integers(0, len(fine), m)] + noise * rng.normal(size=(m, d)).astype(
            np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


class PeakRSS:
    """Samples the resident memory of this process and its children every 20 ms."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a child may exit between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 3)


@contextmanager
def measured(record: dict[str, Any], name: str) -> Iterator[None]:
    """Adds ``<name>_s`` and ``<name>_peak_gib`` to ``record``."""
    start = time.perf_counter()
    with PeakRSS() as rss:
        yield
    record[f"{name}_s"] = round(time.perf_counter() - start, 2)
    record[f"{name}_peak_gib"] = rss.peak_gib


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)
    sys.stdout.flush()


def window_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact rank window that the approximate window also holds."""
    hits = [len(np.intersect1d(a[a >= 0], e)) / max(1, len(e)) for a, e in zip(approx, exact)]
    return float(np.mean(hits))
