"""The plain PyTorch example runs, learns, and resumes from its checkpoint."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_plain_pytorch.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_plain_pytorch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_example_trains_and_resumes(tmp_path, corpus_path, small_plan):
    example = load_example()
    ckpt = tmp_path / "ckpt.pt"
    first = example.main(["--plan", str(small_plan.path), "--embeddings", str(corpus_path),
                          "--steps", "3", "--checkpoint", str(ckpt)])
    assert math.isfinite(first) and ckpt.is_file()
    import torch

    assert torch.load(ckpt)["sampler"]["batches_yielded"] == 3
    example.main(["--plan", str(small_plan.path), "--embeddings", str(corpus_path),
                  "--steps", "2", "--checkpoint", str(ckpt)])
    assert torch.load(ckpt)["sampler"]["batches_yielded"] == 5  # continued, not restarted
