"""Plain PyTorch: train a tiny dual encoder on a mined plan, with its extra hard negatives,
checkpointing the sampler so that a crash resumes mid-epoch on the exact next batch.

    python examples/train_plain_pytorch.py --plan plans/<plan_id> --embeddings emb.parquet
    python examples/train_plain_pytorch.py --checkpoint ckpt.pt   # run it again: it resumes

Each run trains ``--steps`` more steps (default 6) from the checkpoint, then stops as if it had
been killed; the synthetic plan has 16 batches (2 epochs of 8), so the third run finishes the
plan and a fourth says that nothing is left. Without --plan it mines a small synthetic plan first (needs ``b3mine[mining]``). The data here
are the teacher vectors themselves; in real training the dataset returns texts or token ids.
Under ``torchrun`` the sampler reads rank/world_size from torch.distributed and each rank trains
on its slice of every mined batch.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from trainers import HardNegativeCollator, LocalPlan, PlanBatchSampler


class PairDataset(Dataset):
    """Item i -> (query vector, target vector) of dataset row i."""

    def __init__(self, queries: np.ndarray, targets: np.ndarray) -> None:
        self.q, self.t = torch.tensor(queries), torch.tensor(targets)  # owned, writable copies

    def __len__(self) -> int:
        return len(self.q)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q[i], self.t[i]


def synthetic_plan(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    from b3mine.config import MiningConfig, NegativesConfig
    from b3mine.embeddings import Embeddings
    from b3mine.mining import mine

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    q = (centres[rng.integers(0, 20, 512)] + 0.5 * rng.normal(size=(512, 16))).astype(np.float32)
    t = (q + 0.1 * rng.normal(size=q.shape)).astype(np.float32)
    plan = mine(Embeddings.from_arrays(np.arange(512), q, t),
                MiningConfig(batch_size=64, cluster_size=8, p=2, m=16, epochs=2,
                             negatives=NegativesConfig(mode="hnps", k=2)), root, report=False)
    return plan.path, q, t


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", type=Path, help="a plan directory (default: mine a synthetic one)")
    ap.add_argument("--embeddings", type=Path, help="the embeddings the plan was mined from")
    ap.add_argument("--steps", type=int, default=6,
                    help="steps to train in this run, from the checkpoint on (default 6)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="save after every step; resume from it when it exists")
    a = ap.parse_args(argv)
    if a.plan is None:
        path, q, t = synthetic_plan(Path(tempfile.mkdtemp()) / "plans")
    else:  # the teacher's embeddings stand in for a real dataset here
        from b3mine.embeddings import load_embeddings

        if a.embeddings is None:
            ap.error("--plan needs --embeddings (the file the plan was mined from)")
        path = a.plan
        emb = load_embeddings(a.embeddings)
        q, t = emb.queries, emb.target_matrix
    dataset = PairDataset(q, t)

    plan = LocalPlan(path)
    sampler = PlanBatchSampler(plan, dataset=dataset, negatives=plan.has_negatives)
    collate = HardNegativeCollator(sampler.local_batch_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    model = torch.nn.Linear(q.shape[1], q.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    ckpt = a.checkpoint
    step = 0  # global: steps trained by this run and the runs it resumes
    if ckpt is not None and ckpt.is_file():  # resume: model, optimizer and the plan position
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        print(f"resumed from {ckpt} at step {step}")

    total = plan.epochs * plan.batches_per_epoch
    first, loss = step, torch.tensor(float("nan"))
    for epoch in range(sampler.epoch, plan.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            qe = F.normalize(model(batch["queries"]), dim=-1)   # (B, d)
            ke = F.normalize(model(batch["targets"]), dim=-1)   # (T, d): positives, negatives
            loss = F.cross_entropy(20.0 * qe @ ke.T, batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if ckpt is not None:  # num_workers=0: the sampler's count is exactly what trained
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sampler": sampler.state_dict(), "step": step}, ckpt)
            if step - first >= a.steps:
                print(f"step {step} of the plan's {total} (epoch {epoch}) loss {loss.item():.4f}")
                return loss.item()
    if step == first:
        print(f"nothing to train: the plan's {total} batches ({plan.epochs} epochs x "
              f"{plan.batches_per_epoch}) were all trained by the runs saved in {ckpt}; mine a "
              f"plan with more epochs, or start again without --checkpoint")
    else:
        print(f"step {step}: the plan's {total} batches are all trained (ran past its end "
              f"after {step - first} of the {a.steps} steps asked) loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
