"""Benchmark the contrastive loss backends; one JSON object per line on stdout.

CPU (default, small):   python benchmarks/loss.py
H100 targets (d=512):   python benchmarks/loss.py --device cuda --dtype bf16 --dim 512 \
                            --sizes 8192,65536,262144,1048576

Lines have ``kind`` "speed" (ms fwd+bwd, peak extra GiB, TFLOP/s counted as 8 B^2 d) or
"accuracy" (max relative error of loss/dQ/dK/dscale vs float64 naive at ``--err-size``), or
"skipped" (backend not importable / not runnable on this device).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.losses import contrastive_loss, triton_available  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inf_cl() -> Callable[..., torch.Tensor] | None:
    """Official Inf-CL, when installed (``pip install inf_cl``); symmetric loss only."""
    try:
        from inf_cl import cal_inf_loss  # type: ignore[import-not-found]
    except Exception:
        return None

    def f(q: torch.Tensor, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(q.shape[0], device=q.device)
        return 0.5 * (cal_inf_loss(q, k, labels=labels, scale=s) + cal_inf_loss(k, q, labels=labels, scale=s))

    return f


def _backends(device: str) -> tuple[dict[str, Callable[..., torch.Tensor]], dict[str, str]]:
    impls: dict[str, Callable[..., torch.Tensor]] = {
        "naive": lambda q, k, s: contrastive_loss(q, k, scale=s, impl="naive"),
        "tiled": lambda q, k, s: contrastive_loss(q, k, scale=s, impl="tiled"),
    }
    skipped: dict[str, str] = {}
    if device == "cuda" and triton_available(device):
        impls["triton"] = lambda q, k, s: contrastive_loss(q, k, scale=s, impl="triton")
    else:
        skipped["triton"] = "needs CUDA (the interpreter is for tests only)"
    inf = _inf_cl()
    if inf is not None:
        impls["inf_cl"] = inf
    else:
        skipped["inf_cl"] = "package inf_cl not installed"
    return impls, skipped


def _inputs(b: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device=device, dtype=dtype)
    k = F.normalize(q.float().cpu() + 0.3 * torch.randn(b, d, generator=g), dim=1).to(device=device, dtype=dtype)
    return q, k


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, s: float) -> list[torch.Tensor]:
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    st = torch.tensor(s, device=q.device, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      requires_grad=True)
    loss = fn(q, k, st)
    loss.backward()
    return [loss.detach(), q.grad, k.grad, st.grad]  # type: ignore[list-item]


def speed(name: str, fn: Callable[..., torch.Tensor], b: int, d: int, dtype: torch.dtype, device: str,
          scale: float, repeat: int) -> dict[str, Any]:
    q, k = _inputs(b, d, dtype, device)
    row: dict[str, Any] = dict(kind="speed", impl=name, device=device, dtype=str(dtype).split(".")[-1],
                               B=b, d=d, symmetric=True)
    try:
        _step(fn, q, k, scale)  # warm-up / compile
        _sync(device)
        base = 0
        if device == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = _step(fn, q, k, scale)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            del out
        ms = statistics.median(times)
        row.update(ms_fwd_bwd=round(ms, 3), tflops=round(8 * b * b * d / (ms * 1e-3) / 1e12, 3))
        # Extra memory beyond the inputs (gradients of q, k included). CPU: not measured.
        row["peak_extra_gib"] = (round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
                                 if device == "cuda" else None)
    except torch.cuda.OutOfMemoryError:
        row.update(error="out of memory")
    return row


def accuracy(name: str, fn: Callable[..., torch.Tensor], b: int, d: int, dtype: torch.dtype, device: str,
             scale: float) -> dict[str, Any]:
    q, k = _inputs(b, d, dtype, device, seed=1)
    ref = _step(lambda q_, k_, s_: contrastive_loss(q_, k_, scale=s_, impl="naive"),
                q.double().cpu(), k.double().cpu(), scale)
    got = _step(fn, q, k, scale)
    errs = [float((a.double().cpu() - r).norm() / r.norm()) for a, r in zip(got, ref)]
    return dict(kind="accuracy", impl=name, device=device, dtype=str(dtype).split(".")[-1], B=b, d=d,
                scale=scale, rel_err_loss=errs[0], rel_err_dq=errs[1], rel_err_dk=errs[2],
                rel_err_dscale=errs[3], max_grad_rel_err=max(errs[1:]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=None, help="comma-separated B (default: CPU 512,1024,2048)")
    ap.add_argument("--dim", type=int, default=None, help="d (default: 128 on CPU, 512 on CUDA)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--scale", type=float, default=1 / 0.07)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--impls", default=None, help="subset, e.g. tiled,triton")
    ap.add_argument("--err-size", type=int, default=2048, help="B of the float64 accuracy check (0: skip)")
    ap.add_argument("--naive-max", type=int, default=65536, help="skip naive above this B")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    sizes = [int(x) for x in (a.sizes or ("8192,32768,65536" if cuda else "512,1024,2048")).split(",")]
    d = a.dim or (512 if cuda else 128)
    dtype = DTYPES[a.dtype]
    impls, skipped = _backends(a.device)
    if a.impls:
        keep = set(a.impls.split(","))
        impls = {n: f for n, f in impls.items() if n in keep}
    for n, why in skipped.items():
        print(json.dumps(dict(kind="skipped", impl=n, reason=why)), flush=True)
    for n, f in impls.items():
        if a.err_size:
            print(json.dumps(accuracy(n, f, a.err_size, d, dtype, a.device, a.scale)), flush=True)
        for b in sizes:
            if n == "naive" and b > a.naive_max:
                continue
            print(json.dumps(speed(n, f, b, d, dtype, a.device, a.scale, a.repeat)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
