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


def test_example_defaults_resume_and_say_when_the_plan_is_done(tmp_path, capsys):
    """Its own defaults: each run trains 6 more steps of the 16-batch synthetic plan."""
    example = load_example()
    ckpt = ["--checkpoint", str(tmp_path / "ckpt.pt")]
    outputs = []
    for _ in range(4):
        example.main(ckpt)
        outputs.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert outputs[0].startswith("step 6 of the plan's 16 (epoch 0)")
    assert outputs[1].startswith("step 12 of the plan's 16 (epoch 1)")
    assert outputs[2].startswith("step 16: the plan's 16 batches are all trained (ran past its "
                                 "end after 4 of the 6 steps asked)")
    assert outputs[3].startswith("nothing to train: the plan's 16 batches (2 epochs x 8) were "
                                 "all trained")
