"""Ring loss over gloo: W CPU processes must reproduce the single-process full-batch loss."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.losses.reference import naive_contrastive_loss

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is required")


def _global_batch(world: int, masked: bool) -> dict[str, object]:
    """Unequal per-rank sizes, extra hard negatives, optional masks (fixed seed)."""
    g = torch.Generator().manual_seed(1234 + world)
    d = 6
    bs = [3 + r for r in range(world)]
    ts = [b + r % 3 for r, b in enumerate(bs)]
    q = [torch.randn(b, d, generator=g, dtype=torch.float64) for b in bs]
    k = [torch.randn(t, d, generator=g, dtype=torch.float64) for t in ts]
    labels = [torch.randperm(t, generator=g)[:b] for b, t in zip(bs, ts)]
    k[0][1] = q[world - 1][0]  # a cross-rank duplicate, i.e. a false negative
    out: dict[str, object] = dict(q=q, k=k, labels=labels, bs=bs, ts=ts)
    if masked:
        w = [torch.rand(b, generator=g, dtype=torch.float64) + 0.5 for b in bs]
        w[0][0] = 0.0
        tv = [torch.rand(t, generator=g) > 0.2 for t in ts]
        for r in range(world):
            tv[r][labels[r]] = True
        qg = [torch.randint(0, 4, (b,), generator=g) for b in bs]
        tg = [torch.randint(0, 4, (t,), generator=g) for t in ts]
        out.update(w=w, tv=tv, qg=qg, tg=tg)
    return out


def _worker(rank: int, world: int, init: str, out_dir: str, masked: bool) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        from trainers.losses.ring import ring_contrastive_loss

        torch.set_num_threads(1)
        data = _global_batch(world, masked)
        q = data["q"][rank].clone().requires_grad_()  # type: ignore[index]
        k = data["k"][rank].clone().requires_grad_()  # type: ignore[index]
        s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        kw = {}
        if masked:
            kw = dict(query_weight=data["w"][rank], target_valid=data["tv"][rank],  # type: ignore[index]
                      query_groups=data["qg"][rank], target_groups=data["tg"][rank])  # type: ignore[index]
        loss = ring_contrastive_loss(q, k, data["labels"][rank], s, impl="tiled",  # type: ignore[index]
                                     block_q=2, block_k=3, **kw)
        loss.backward()
        torch.save(dict(loss=loss.detach(), dq=q.grad, dk=k.grad, ds=s.grad), f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("world,masked", [(2, False), (4, True)])
def test_ring_matches_full_batch(tmp_path: Path, world: int, masked: bool) -> None:
    init = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_worker, args=(world, init, str(tmp_path), masked), nprocs=world, join=True)
    data = _global_batch(world, masked)
    q = torch.cat(data["q"]).requires_grad_()  # type: ignore[arg-type]
    k = torch.cat(data["k"]).requires_grad_()  # type: ignore[arg-type]
    offs = torch.tensor([0] + list(data["ts"])).cumsum(0)[:-1]  # type: ignore[arg-type]
    labels = torch.cat([lab + offs[r] for r, lab in enumerate(data["labels"])])  # type: ignore[arg-type]
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    kw = {}
    if masked:
        kw = dict(query_weight=torch.cat(data["w"]), target_valid=torch.cat(data["tv"]),  # type: ignore[arg-type]
                  query_groups=torch.cat(data["qg"]), target_groups=torch.cat(data["tg"]))  # type: ignore[arg-type]
    ref = naive_contrastive_loss(q, k, labels, s, **kw)
    ref.backward()
    res = [torch.load(tmp_path / f"r{r}.pt") for r in range(world)]
    for r in res:
        torch.testing.assert_close(r["loss"], ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["ds"], s.grad, rtol=1e-10, atol=1e-12)
    assert q.grad is not None and k.grad is not None
    torch.testing.assert_close(torch.cat([r["dq"] for r in res]), q.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["dk"] for r in res]), k.grad, rtol=1e-10, atol=1e-12)
