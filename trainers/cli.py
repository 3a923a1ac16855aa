"""``b3mine train``: the reference dual-encoder trainer (registered by entry point).

    b3mine train                                   # static student, B3 plan + HNPS + curriculum
    b3mine train --sampler random --batch-size 32 --steps 600
    b3mine train --model student --sampler random  # the from-scratch student
    b3mine train --plan http://localhost:8000/v1/plans/<id> --model minilm --steps 200
    b3mine train --config run.toml --seed 3        # flags override the file
    b3mine train --resume                          # continue the run in --output-dir
    b3mine train --overwrite                       # replace it (a fresh run there is refused)
    b3mine train --remine-every 100                # the student re-mines its plan

The function is typer-compatible: `b3mine.cli` adds it as the ``train`` sub-command.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from trainers.train.config import TrainConfig

#: Files of a previous run that a new run in the same directory would overwrite.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "results.json", "config.json")
_P_DEFAULT = TrainConfig.model_fields["p"].default
_M_DEFAULT = TrainConfig.model_fields["m"].default


def check_run_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run over a previous one unless asked to (``--overwrite``)."""
    import shutil

    from b3mine.errors import InputError

    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise InputError(f"holds a previous run ({', '.join(found)}): pass --resume to continue "
                         f"it, --overwrite to replace it, or another --output-dir",
                         file=str(output_dir))
    for name in found:
        (output_dir / name).unlink()
    shutil.rmtree(output_dir / "tb", ignore_errors=True)


def train(
    config_file: Annotated[Optional[Path], typer.Option(
        "--config", exists=True, dir_okay=False,
        help="JSON/TOML TrainConfig; the flags below override it")] = None,
    model: Annotated[Optional[str], typer.Option(help="student | static | minilm")] = None,
    objective: Annotated[Optional[str], typer.Option(help="infonce | sogclr | em")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="plan | random | kmeans")] = None,
    plan: Annotated[Optional[str], typer.Option(
        help="plan directory or URL http://host/v1/plans/<id> (default: mine on the train "
             "split)")] = None,
    batch_grouping: Annotated[Optional[str], typer.Option(
        help="mined plan: affinity | random")] = None,
    cluster_size: Annotated[Optional[int], typer.Option(
        help="K for the mined plan / k-means (default batch_size/4, at most 32)")] = None,
    p: Annotated[Optional[int], typer.Option(
        "--p", help=f"mined plan: skip the teacher's top p ranks (default {_P_DEFAULT}; "
        f"`b3mine mine` defaults to B3's p=30, tuned for millions of examples, where the top "
        f"ranks are mostly false negatives; the train split here is a few thousand pairs, "
        f"whose near neighbours are the hard negatives worth keeping)")] = None,
    m: Annotated[Optional[int], typer.Option(
        "--m", help=f"mined plan: keep ranks [p, p+m) as graph edges (default "
        f"{_M_DEFAULT})")] = None,
    hard_negatives: Annotated[Optional[bool], typer.Option(
        "--hard-negatives/--no-hard-negatives", help="use the plan's HNPS negatives (default: "
        "when the plan has them; a plan b3mine train mines has them)")] = None,
    curriculum: Annotated[Optional[float], typer.Option(
        help="mined plan: share of the steps over which batches go from random to hard "
             "(default 0.5; 0 = off)")] = None,
    batch_size: Optional[int] = None,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    gradcache_chunk: Annotated[Optional[int], typer.Option(help="GradCache chunk size")] = None,
    guide_margin: Annotated[Optional[float], typer.Option(
        help="teacher-guided in-batch masking: drop negatives the teacher scores above the "
             "positive minus this margin (default: off)")] = None,
    adapter_steps: Annotated[Optional[int], typer.Option(help="adapter phase 2 steps")] = None,
    transfer_steps: Annotated[Optional[int], typer.Option(help="adapter phase 3 steps")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Parquet of pairs (default: the demo corpus)")] = None,
    max_pairs: Annotated[Optional[int], typer.Option(help="train on a subset")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="run directory")] = None,
    remine_every: Annotated[Optional[int], typer.Option(
        help="re-mine the plan with the student every N steps (trainers.remine)")] = None,
    remine_lag: Annotated[Optional[int], typer.Option(
        help="steps a refresh may take before training waits for it")] = None,
    remine_teacher_weight: Annotated[Optional[float], typer.Option(
        help="mine refreshes on a*teacher + (1-a)*student cosine")] = None,
    remine_mode: Annotated[Optional[str], typer.Option(
        help="refresh | probe (measure batch hardness only)")] = None,
    remine_service: Annotated[Optional[str], typer.Option(
        help="mine refreshes as jobs of this service, http://host:port")] = None,
    remine_service_data: Annotated[Optional[Path], typer.Option(
        help="that service's data root as this machine mounts it")] = None,
    eval_every: Optional[int] = None,
    checkpoint_every: Optional[int] = None,
    threads: Optional[int] = None,
    resume: Annotated[bool, typer.Option(
        help="continue from output_dir/checkpoint.pt when it exists")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="replace a previous run in output_dir (without it, a fresh run there is "
             "refused)")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a dual encoder on pairs with B3 plan / random / k-means batches; evaluate on
    held-out pairs (recall@1, recall@10, MRR)."""
    from rich.console import Console

    console = Console()
    base = TrainConfig.from_file(config_file) if config_file else TrainConfig()
    flags: dict[str, Any] = dict(
        model=model, objective=objective, sampler=sampler, plan=plan,
        batch_grouping=batch_grouping, cluster_size=cluster_size, p=p, m=m,
        hard_negatives=hard_negatives, curriculum=curriculum,
        batch_size=batch_size, steps=steps, lr=lr, temperature=temperature, seed=seed,
        gradcache_chunk=gradcache_chunk, guide_margin=guide_margin,
        data=str(data) if data else None, max_pairs=max_pairs,
        output_dir=str(output_dir) if output_dir else None, eval_every=eval_every,
        checkpoint_every=checkpoint_every, threads=threads, remine_every=remine_every,
        remine_lag=remine_lag, remine_teacher_weight=remine_teacher_weight,
        remine_mode=remine_mode, remine_service=remine_service,
        remine_service_data=str(remine_service_data) if remine_service_data else None)
    values = base.model_dump()
    values.update({k: v for k, v in flags.items() if v is not None})
    values["progress"] = progress
    adapter = {k: v for k, v in dict(adapter_steps=adapter_steps,
                                     transfer_steps=transfer_steps).items() if v is not None}
    values["adapter"].update(adapter)
    config = TrainConfig.model_validate(values)  # one validation: errors name the whole path
    check_run_dir(Path(config.output_dir), resume=resume, overwrite=overwrite)
    from trainers.train.loop import train as run  # torch: imported once the flags are valid
    console.print(f"[bold]train[/bold] {config.model} / {config.objective} / "
                  f"{config.sampler} batches of {config.batch_size}, {config.steps} steps "
                  f"-> {config.output_dir}")
    result = run(config, resume=resume)
    console.print(f"sampler: {json.dumps(result.sampler)}")
    console.print("held-out (trained):        " + "  ".join(
        f"{k} {v:.4f}" for k, v in result.metrics.items()))
    console.print("teacher (MiniLM, frozen):  " + "  ".join(
        f"{k} {v:.4f}" for k, v in result.teacher.items()))
    console.print(f"{result.steps} steps in {result.seconds:.1f} s; metrics "
                  f"{result.output_dir / 'metrics.jsonl'}, checkpoint "
                  f"{result.output_dir / 'checkpoint.pt'}")
