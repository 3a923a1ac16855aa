"""Does re-mining with the student help? A static teacher plan vs plans the student re-mines.

Trains the reference student (`b3mine train`'s default model) on the demo corpus's train split
for the same number of steps with:

  static         the teacher's B3 plan throughout (``remine_mode="probe"``: every ``--every``
                 steps the student embeds the pairs and the hardness of the batches it is
                 served is logged, nothing is re-mined: the same embedding cost as a refresh)
  refresh        every ``--every`` steps the student's embeddings are mined into a new plan
                 (in-process, in a background thread), taken at the next sampler epoch boundary
  refresh-blend  the same, mined on 0.5 * teacher + 0.5 * student cosine

and logs, per run, held-out recall@1 / MRR every ``--eval-every`` steps, the hardness of the
served batches for the student at every probe/refresh (mean student cosine of a query with the
other targets of its batch, and the mean over random pairs), and the wall-clock cost: total
seconds, seconds spent embedding, waiting for a plan at a switch, and mining (in the
background).

    python benchmarks/remine.py                         # B=32, 600 steps, every 100, 3 seeds
    python benchmarks/remine.py --seeds 0 --steps 200 --plot ''

Prints one JSON line per run, then one summary line per variant; writes the plot
(docs/img/remine.png by default).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

VARIANTS: dict[str, dict[str, Any]] = {
    "static": {"remine_mode": "probe"},
    "refresh": {"remine_mode": "refresh"},
    "refresh-blend": {"remine_mode": "refresh", "remine_teacher_weight": 0.5},
}


# The trainer settings the README's re-mining figures were measured with (the defaults then):
# the from-scratch student, plain plan batches; later defaults would change every row.
MEASURED_WITH: dict[str, Any] = {"model": "student", "temperature": 0.05,
                                 "hard_negatives": False, "curriculum": 0.0}


def run_one(variant: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from trainers.train.config import TrainConfig
    from trainers.train.loop import train

    out = work / f"{variant}-{seed}"
    cfg = TrainConfig(**MEASURED_WITH, batch_size=args.batch_size, steps=args.steps, seed=seed,
                      remine_every=args.every, eval_every=args.eval_every,
                      output_dir=str(out), plans_dir=str(work / "plans"), progress=False,
                      **VARIANTS[variant])
    result = train(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    events = [x for x in lines if x["type"] == "remine"]
    probes = [x for x in events if x["event"] in ("probe", "submitted", "skipped")]

    def total(key: str) -> float:
        return round(sum(x.get(key, 0.0) for x in events), 3)

    return {
        "variant": variant, "seed": seed, "batch_size": args.batch_size, "steps": args.steps,
        "every": args.every, "metrics": result.metrics, "teacher": result.teacher,
        "seconds": round(result.seconds, 2), "embed_seconds": total("embed_seconds"),
        "wait_seconds": total("wait_seconds"), "mine_seconds": total("mine_seconds"),
        "switches": sum(x["event"] == "switched" for x in events),
        "hardness": [{"step": x["step"], "hardness": x["hardness"], "random": x["random"]}
                     for x in probes if "hardness" in x],
        "eval": [{k: x[k] for k in ("step", "recall@1", "recall@10", "mrr")}
                 for x in lines if x["type"] == "eval"],
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(values: list[float]) -> list[float]:
        return [round(statistics.mean(values), 4),
                round(statistics.stdev(values), 4) if len(values) > 1 else 0.0]

    return {"variant": runs[0]["variant"], "seeds": [r["seed"] for r in runs],
            **{k: ms([r["metrics"][k] for r in runs]) for k in ("recall@1", "recall@10", "mrr")},
            **{k: ms([r[k] for r in runs]) for k in ("seconds", "embed_seconds",
                                                     "wait_seconds", "mine_seconds")}}


def curve(runs: list[dict[str, Any]], key: str, field: str) -> tuple[list[int], list[float]]:
    steps = [x["step"] for x in runs[0][key]]
    return steps, [statistics.mean(r[key][i][field] if field != "gap" else
                                   r[key][i]["hardness"] - r[key][i]["random"] for r in runs)
                   for i in range(len(steps))]


def plot(by_variant: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant, runs in by_variant.items():
        left.plot(*curve(runs, "hardness", "gap"), marker="o", label=variant)
        right.plot(*curve(runs, "eval", "recall@1"), marker=".", label=variant)
    left.set(xlabel="step", ylabel="student cosine: in-batch negatives - random pairs",
             title="how hard the served batches are for the student")
    right.set(xlabel="step", ylabel="held-out recall@1", title="held-out recall@1")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--plot", default="docs/img/remine.png", help="'' = no plot")
    args = ap.parse_args()
    by_variant: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="b3mine-remine-") as tmp:
        for variant in args.variants:
            for seed in args.seeds:
                r = run_one(variant, seed, args, Path(tmp))
                print(json.dumps(r), flush=True)
                by_variant.setdefault(variant, []).append(r)
    for runs in by_variant.values():
        print(json.dumps({"summary": summarise(runs)}), flush=True)
    if args.plot:
        plot(by_variant, Path(args.plot),
             f"demo corpus, student model, B={args.batch_size}, {args.steps} steps, re-mined "
             f"every {args.every}; mean of seeds {args.seeds} (2 shared CPU cores)")


if __name__ == "__main__":
    main()
