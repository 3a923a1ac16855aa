"""Three-phase adapter training: exact segmented transfer, end-to-end run, mid-phase resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from trainers.adapter import (AdapterModel, PhaseState, adapter_step, cache_features, cotrain_step,
                              load_checkpoint, save_checkpoint, transfer_step)
from trainers.losses import contrastive_loss

N, D_IN = 24, 6


def _loss(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return contrastive_loss(nn.functional.normalize(q, dim=1), nn.functional.normalize(t, dim=1), scale=8.0)


def _models(dropout: float = 0.2) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(D_IN, 10), nn.Tanh(), nn.Dropout(dropout), nn.Linear(10, 8)).double()
    adapter = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    return backbone, adapter


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return x, x + 0.3 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("train_adapter", [False, True])
def test_transfer_gradient_equals_full_batch_backbone_gradient(train_adapter: bool) -> None:
    backbone, adapter = _models(dropout=0.0)
    x, y = _data()
    ref = _loss(adapter(backbone(x)), adapter(backbone(y)))
    ref.backward()
    want_b = [p.grad.clone() for p in backbone.parameters()]
    want_a = [p.grad.clone() for p in adapter.parameters()]
    backbone.zero_grad(set_to_none=True), adapter.zero_grad(set_to_none=True)
    value = transfer_step(backbone, adapter, x, y, _loss, chunk_size=5, train_adapter=train_adapter)
    assert value == pytest.approx(ref.item(), abs=1e-12)
    for p, w in zip(backbone.parameters(), want_b):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
    for p, w in zip(adapter.parameters(), want_a):
        if train_adapter:
            torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
        else:
            assert p.grad is None and p.requires_grad   # frozen for the step only


def test_adapter_step_uses_cached_features_and_hard_negatives() -> None:
    backbone, adapter = _models()
    x, y = _data()
    backbone.train()
    fq = cache_features(backbone, x.split(7))
    assert backbone.training                        # mode restored; cache computed in eval mode
    backbone.eval()
    torch.testing.assert_close(fq, backbone(x))
    ft = cache_features(backbone, [(yy, "label") for yy in y.split(5)], select=lambda b: b[0])
    rows, negs = torch.tensor([0, 4, 9, 13]), torch.tensor([20, 21])
    ref = _loss(adapter(fq[rows]), adapter(ft[torch.cat([rows, negs])]))
    ref.backward()
    want = [p.grad.clone() for p in adapter.parameters()]
    for chunk in (None, 3):
        adapter.zero_grad(set_to_none=True)
        v = adapter_step(adapter, fq, ft, rows, _loss, target_indices=torch.cat([rows, negs]), chunk_size=chunk)
        assert v == pytest.approx(ref.item(), abs=1e-12)
        for p, w in zip(adapter.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)


SCHEDULE = (3, 4, 3)


def _batch(phase: int, step: int, size: int) -> torch.Tensor:
    # Data order derived from (phase, step): a resumed run sees the same batches.
    return torch.randperm(N, generator=torch.Generator().manual_seed(100 * phase + step))[:size]


def _run(ckpt: Path, *, stop_after: int | None = None, resume: bool = False) -> dict[str, torch.Tensor] | None:
    """Three phases on a tiny backbone (with dropout) + adapter; checkpoint after every step."""
    x, y = _data()
    backbone, adapter = _models()
    opt1 = torch.optim.SGD([*backbone.parameters(), *adapter.parameters()], lr=0.1, momentum=0.9)
    opt2 = torch.optim.Adam(adapter.parameters(), lr=0.01)
    opt3 = torch.optim.SGD(backbone.parameters(), lr=0.05, momentum=0.9)
    modules = {"backbone": backbone, "adapter": adapter}
    optimizers = {"cotrain": opt1, "adapt": opt2, "transfer": opt3}
    torch.manual_seed(42)
    state = PhaseState(schedule=SCHEDULE)
    if resume:
        state, _ = load_checkpoint(ckpt, modules=modules, optimizers=optimizers)
    model = AdapterModel(backbone, adapter)
    feats: tuple[torch.Tensor, torch.Tensor] | None = None
    done = 0
    losses = []
    while not state.done:
        if state.phase == 1:
            rows = _batch(1, state.step, 4)
            losses.append(cotrain_step(model, x[rows], y[rows], _loss, optimizer=opt1))
        elif state.phase == 2:
            if feats is None:   # frozen backbone: recomputing the cache after a resume is exact
                feats = (cache_features(backbone, x.split(10)), cache_features(backbone, y.split(10)))
            rows = _batch(2, state.step, 16)
            losses.append(adapter_step(adapter, *feats, rows, _loss, optimizer=opt2))
        else:
            rows = _batch(3, state.step, 12)
            losses.append(transfer_step(backbone, adapter, x[rows], y[rows], _loss, chunk_size=5, optimizer=opt3))
        state.advance()
        save_checkpoint(ckpt, state, modules=modules, optimizers=optimizers)
        done += 1
        if stop_after is not None and done == stop_after:
            return None
    out = {f"{k}.{n}": t.detach().clone() for k, m in modules.items() for n, t in m.state_dict().items()}
    out["rng"] = torch.get_rng_state()
    out["last_loss"] = torch.tensor(losses[-1])
    return out


@pytest.mark.parametrize("stop_after", [2, 5, 8])   # mid phase 1, mid phase 2, mid phase 3
def test_three_phases_resume_mid_phase_identically(tmp_path: Path, stop_after: int) -> None:
    full = _run(tmp_path / "a.pt")
    assert full is not None
    assert _run(tmp_path / "b.pt", stop_after=stop_after) is None
    resumed = _run(tmp_path / "b.pt", resume=True)
    assert resumed is not None
    for key, value in full.items():
        assert torch.equal(value, resumed[key]), key
    # The run actually trained: the backbone moved in phases 1 and 3.
    b0, _ = _models()
    assert not torch.equal(full["backbone.0.weight"], b0[0].weight)


def test_phase_state_round_trip_and_errors() -> None:
    s = PhaseState(phase=2, step=1, schedule=(3, 4, 3), extra={"epoch": 2})
    assert PhaseState.from_dict(s.to_dict()) == s and s.name == "adapt"
    s = PhaseState(schedule=(0, 0, 0))
    assert s.done
    with pytest.raises(RuntimeError):
        s.advance()
