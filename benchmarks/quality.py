"""Does B3 batching train a better retriever? Random vs TAS-style k-means vs B3 plan batches.

Trains the reference student (`b3mine train`'s default model: word-piece EmbeddingBag + linear,
from scratch, InfoNCE) on the demo corpus's train split (stdlib name -> docstring pairs, 85%)
with each batch sampler, at each batch size, for several seeds, all for the same number of
steps and with the same hyper-parameters, and evaluates recall@1 / recall@10 / MRR on the
held-out 15% (each held-out name ranks all held-out docstrings).

Samplers:
  random     uniformly random batches (a fresh permutation per epoch)
  kmeans     TAS-style: spherical k-means topics of the teacher's target embeddings, whole
             topics per batch (trainers/train/batching.py)
  b3         B3 plan mined on the train split: p=10, m=100, METIS, K=B/4, affinity grouping
  b3-random  the same plan recipe with B3's original random grouping of clusters
  b3-hnps    b3 plus the plan's HNPS extra hard negatives (5 per example) as extra targets

The seed changes the model init, the batches and (for plans and k-means) the mining seed.

    python benchmarks/quality.py                       # all samplers, B in {32, 128}, 3 seeds
    python benchmarks/quality.py --samplers random b3 --steps 200 --seeds 0

Prints one JSON line per run, a JSON summary per (sampler, batch size), and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SAMPLERS: dict[str, dict[str, Any]] = {
    "random": {"sampler": "random"},
    "kmeans": {"sampler": "kmeans"},
    "b3": {"sampler": "plan", "batch_grouping": "affinity"},
    "b3-random": {"sampler": "plan", "batch_grouping": "random"},
    "b3-hnps": {"sampler": "plan", "batch_grouping": "affinity", "hard_negatives": True},
}
LABELS = {
    "random": "random batches",
    "kmeans": "TAS-style k-means topics",
    "b3": "B3 plan, affinity grouping",
    "b3-random": "B3 plan, random grouping",
    "b3-hnps": "B3 plan, affinity + HNPS negatives",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--max-pairs", type=int, default=None, help="subset (smoke runs)")
    ap.add_argument("--out", type=Path, default=Path(".b3mine/quality"),
                    help="run directories and mined plans go here")
    a = ap.parse_args(argv)

    from trainers.train.config import TrainConfig
    from trainers.train.data import load_pairs
    from trainers.train.evaluate import teacher_metrics
    from trainers.train.loop import train

    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    teacher: dict[str, float] | None = None
    for b in a.batch_sizes:
        for name in a.samplers:
            for seed in a.seeds:
                cfg = TrainConfig(**SAMPLERS[name], batch_size=b, steps=a.steps, lr=a.lr,
                                  temperature=a.temperature, seed=seed, max_pairs=a.max_pairs,
                                  output_dir=str(a.out / "runs" / f"{name}-b{b}-s{seed}"),
                                  plans_dir=str(a.out / "plans"), progress=False)
                if teacher is None:
                    teacher = teacher_metrics(load_pairs(cfg).eval)
                r = train(cfg)
                row = {"sampler": name, "batch_size": b, "seed": seed, "steps": r.steps,
                       **r.metrics, "seconds": round(r.seconds, 2),
                       "final_train_loss": round(statistics.fmean(r.losses[-20:]), 4),
                       **{k: v for k, v in r.sampler.items()
                          if k in ("plan_id", "hardness_vs_random", "topics")}}
                runs.append(row)
                print(json.dumps(row), flush=True)

    summary = []
    for b in a.batch_sizes:
        for name in a.samplers:
            rows = [r for r in runs if r["sampler"] == name and r["batch_size"] == b]
            entry: dict[str, Any] = {"summary": name, "batch_size": b, "runs": len(rows)}
            for k in ("recall@1", "recall@10", "mrr"):
                m, s = mean_std([r[k] for r in rows])
                entry[k] = {"mean": round(m, 4), "std": round(s, 4)}
            summary.append(entry)
            print(json.dumps(entry), flush=True)
    print(json.dumps({"teacher": teacher, "seconds": round(time.perf_counter() - start, 1)}),
          flush=True)

    print(f"\n| sampler | B | recall@1 (mean ± std, {len(a.seeds)} seeds) | recall@10 | MRR |")
    print("|---|---|---|---|---|")
    for e in summary:
        r1, r10, mrr = e["recall@1"], e["recall@10"], e["mrr"]
        print(f"| {LABELS[e['summary']]} | {e['batch_size']} | "
              f"{r1['mean']:.3f} ± {r1['std']:.3f} | {r10['mean']:.3f} ± {r10['std']:.3f} | "
              f"{mrr['mean']:.3f} ± {mrr['std']:.3f} |")
    if teacher:
        print(f"| teacher all-MiniLM-L6-v2 (frozen, reference) | - | {teacher['recall@1']:.3f} | "
              f"{teacher['recall@10']:.3f} | {teacher['mrr']:.3f} |")
    plot = plot_summary(summary, teacher, a.batch_sizes, a.out / "quality.png")
    print(f"\nplot: {plot}")
    return runs


def plot_summary(summary: list[dict[str, Any]], teacher: dict[str, float] | None,
                 batch_sizes: list[int], path: Path) -> Path:
    """Recall@1 (mean ± std over seeds) per sampler, grouped by batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(e["summary"] for e in summary))
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, name in enumerate(names):
        rows = {e["batch_size"]: e["recall@1"] for e in summary if e["summary"] == name}
        xs = [j + i * width for j, b in enumerate(batch_sizes) if b in rows]
        ax.bar(xs, [rows[b]["mean"] for b in batch_sizes if b in rows], width,
               yerr=[rows[b]["std"] for b in batch_sizes if b in rows], capsize=3,
               label=LABELS[name])
    if teacher:
        ax.axhline(teacher["recall@1"], color="black", linestyle="--", linewidth=1,
                   label="teacher MiniLM (frozen)")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(batch_sizes))],
                  [f"batch {b}" for b in batch_sizes])
    ax.set_ylabel("held-out recall@1")
    lows = [e["recall@1"]["mean"] - 2 * e["recall@1"]["std"] for e in summary]
    ax.set_ylim(max(0.0, min(lows) - 0.05), None)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Demo corpus, student encoder: batch sampler vs held-out recall@1")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
