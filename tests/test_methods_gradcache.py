"""GradCache: chunked encoding + cached representation gradients == the full-batch gradient."""
from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainers.gradcache import GradCache, chunk_inputs, encode_chunks, segmented_backward
from trainers.losses import TiledContrastiveLoss, contrastive_loss

D_IN, D_OUT = 6, 4


def _tower(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, D_OUT)).double()


def _loss(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Hard negatives: T = 9 targets for B = 7 queries.
    return contrastive_loss(nn.functional.normalize(q, dim=1), nn.functional.normalize(t, dim=1), scale=5.0)


def _grads(*models: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for m in models:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p.grad.detach().clone())
    return out


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, D_IN, generator=g, dtype=torch.float64), torch.randn(9, D_IN, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shared", [True, False])
def test_gradcache_equals_full_batch_gradient(shared: bool) -> None:
    x, y = _data()
    q_tower = _tower(0)
    t_tower = q_tower if shared else _tower(1)
    ref = _loss(q_tower(x), t_tower(y))
    ref.backward()
    want = _grads(q_tower, t_tower)
    for m in {id(q_tower): q_tower, id(t_tower): t_tower}.values():
        m.zero_grad()
    gc = GradCache(q_tower, None if shared else t_tower, loss_fn=_loss, chunk_size=3)  # uneven chunks
    value = gc.step(x, y)
    assert value == pytest.approx(ref.item(), abs=1e-12)
    for a, b in zip(_grads(q_tower, t_tower), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_dropout_replay_gives_the_gradient_of_the_same_masks() -> None:
    """With dropout on, the reference is one ordinary forward per chunk from the same seed (so the
    same masks): GradCache must match it, and must NOT match without RNG replay."""
    x, y = _data()
    tower = _tower(0, dropout=0.5)
    torch.manual_seed(123)
    reps_q = torch.cat([tower(c) for c in chunk_inputs(x, 3)])
    reps_t = torch.cat([tower(c) for c in chunk_inputs(y, 3)])
    _loss(reps_q, reps_t).backward()
    want = _grads(tower)
    after_ref = torch.get_rng_state()

    tower.zero_grad()
    torch.manual_seed(123)
    GradCache(tower, loss_fn=_loss, chunk_size=3).step(x, y)
    for a, b in zip(_grads(tower), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The random stream continues exactly as after the ordinary forwards.
    assert torch.equal(torch.get_rng_state(), after_ref)

    # Without replay the re-encoding draws fresh masks: a different (wrong) gradient.
    tower.zero_grad()
    torch.manual_seed(123)
    rq, _ = encode_chunks(tower, x, 3)
    rt, _ = encode_chunks(tower, y, 3)
    rq, rt = rq.requires_grad_(), rt.requires_grad_()
    _loss(rq, rt).backward()
    segmented_backward(tower, x, rq.grad, chunk_size=3)
    segmented_backward(tower, y, rt.grad, chunk_size=3)
    assert not torch.allclose(_grads(tower)[0], want[0])


class _DictTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _tower(2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": self.inner(x) * scale[:, None]}


def test_mapping_inputs_and_learnable_loss_parameters() -> None:
    x, y = _data()
    sx, sy = torch.rand(7, dtype=torch.float64) + 0.5, torch.rand(9, dtype=torch.float64) + 0.5
    tower = _DictTower()
    loss_mod = TiledContrastiveLoss(temperature=0.2, learnable=True).double()
    ref = loss_mod(tower(x, sx)["sentence_embedding"], tower(y, sy)["sentence_embedding"])
    ref.backward()
    want = _grads(tower, loss_mod)
    tower.zero_grad(), loss_mod.zero_grad()
    GradCache(tower, loss_fn=loss_mod, chunk_size=4).step({"x": x, "scale": sx}, {"x": y, "scale": sy})
    for a, b in zip(_grads(tower, loss_mod), want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_string_inputs_with_custom_encode() -> None:
    vocab = {w: i for i, w in enumerate("abcdefghij")}
    emb = nn.Embedding(len(vocab), D_OUT).double()

    def encode(model: nn.Module, words: list[str]) -> torch.Tensor:
        return model(torch.tensor([vocab[w] for w in words]))

    qs, ts = list("abcde"), list("fghij")
    ref = _loss(encode(emb, qs), encode(emb, ts))
    ref.backward()
    want = emb.weight.grad.clone()
    emb.zero_grad()
    value = GradCache(emb, loss_fn=_loss, chunk_size=2, encode=encode).step(qs, ts)
    assert value == pytest.approx(ref.item())
    torch.testing.assert_close(emb.weight.grad, want)


def test_loss_kwargs_are_forwarded() -> None:
    x, y = _data()
    tower = _tower(0)
    seen: dict[str, Any] = {}

    def loss_fn(q: torch.Tensor, t: torch.Tensor, *, indices: torch.Tensor) -> torch.Tensor:
        seen["indices"] = indices
        return _loss(q, t)

    GradCache(tower, loss_fn=loss_fn, chunk_size=5).step(x, y, indices=torch.arange(7))
    assert seen["indices"].tolist() == list(range(7))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("shared", [True, False])
def test_ddp_all_reduces_once_per_tower(shared: bool) -> None:
    """Single-rank gloo DDP: gradients unchanged, and the all-reduce hook fires only for the
    last chunk of each model (no_sync on the others)."""
    x, y = _data()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        plain_q = _tower(0)
        plain_t = plain_q if shared else _tower(1)
        _loss(plain_q(x), plain_t(y)).backward()
        want = _grads(plain_q, plain_t)
        calls = {"n": 0}

        # No annotations: DDP inspects them and rejects the string form that
        # `from __future__ import annotations` produces.
        def hook(state, bucket):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp_q = nn.parallel.DistributedDataParallel(_tower(0), bucket_cap_mb=1000)
        ddp_q.register_comm_hook(None, hook)
        ddp_t = None
        if not shared:
            ddp_t = nn.parallel.DistributedDataParallel(_tower(1), bucket_cap_mb=1000)
            ddp_t.register_comm_hook(None, hook)
        GradCache(ddp_q, ddp_t, loss_fn=_loss, chunk_size=3).step(x, y)
        got = _grads(ddp_q.module) + ([] if ddp_t is None else _grads(ddp_t.module))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert calls["n"] == (1 if shared else 2)
    finally:
        dist.destroy_process_group()
