"""Benchmark the embedding stage (``b3mine embed``): texts per second; one JSON line per run.

CPU (default, small):  python benchmarks/embed.py --pairs 512
GPU:                   python benchmarks/embed.py --device cuda --pairs 100000 --batch-size 512

Texts are the demo corpus (standard-library docstring pairs: short names, paragraph targets),
so every machine measures the same texts. Two figures per run:

* ``encode``: `b3mine.teacher.encode_pairs` alone (length-sorted batches, the model loaded);
* ``embed``: the whole `b3mine.teacher.embed` job into a fresh file (read the texts, hash them,
  encode shard by shard, save shards, assemble the Parquet file), the model already loaded.

Model loading is reported separately (``load_s``). ``texts`` counts queries and targets.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from benchmarks.common import emit  # noqa: E402
from b3mine.demo import MAX_SEQ_LENGTH, build_corpus  # noqa: E402
from b3mine.teacher import (  # noqa: E402
    EmbedOptions,
    embed,
    encode_pairs,
    load_teacher,
    resolve_device,
    resolve_precision,
)
from b3mine.texts import TextPairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto",
                    choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--max-seq-length", type=int, default=MAX_SEQ_LENGTH)
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--teacher", default=None, help="default: the packaged all-MiniLM-L6-v2")
    args = ap.parse_args()

    import numpy as np
    import torch

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    pairs = build_corpus(max_pairs=args.pairs)
    queries, targets = [p.query for p in pairs], [p.target for p in pairs]
    options = EmbedOptions(batch_size=args.batch_size, device=device, precision=precision,
                           max_seq_length=args.max_seq_length)
    record = {"bench": "embed", "teacher": args.teacher or "all-MiniLM-L6-v2 (packaged)",
              "device": device, "precision": precision, "pairs": len(pairs),
              "texts": 2 * len(pairs), "batch_size": args.batch_size,
              "max_seq_length": args.max_seq_length, "torch_threads": torch.get_num_threads(),
              "cpu_cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()

    start = time.perf_counter()
    model = load_teacher(args.teacher, device=device, precision=precision,
                         max_seq_length=args.max_seq_length)
    record["load_s"] = round(time.perf_counter() - start, 2)
    encode_pairs(model, queries[:64], targets[:64], options)  # warm-up: first-call overheads

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    vectors = encode_pairs(model, queries, targets, options)
    sync()
    seconds = time.perf_counter() - start
    record["encode_s"] = round(seconds, 2)
    record["encode_texts_per_s"] = round(2 * len(pairs) / seconds, 1)
    record["dim"] = int(vectors.shape[2])
    assert np.isfinite(vectors).all()

    texts = TextPairs(ids=np.array([p.id for p in pairs]), queries=queries, targets=targets,
                      source="demo corpus")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = embed(texts, Path(tmp) / "emb.parquet", teacher=args.teacher, model=model,
                       options=options, shard_rows=args.shard_rows)
        sync()
        seconds = time.perf_counter() - start
    record["embed_s"] = round(seconds, 2)
    record["embed_texts_per_s"] = round(2 * len(pairs) / seconds, 1)
    record["shards"] = result.shards
    record["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    emit(record)


if __name__ == "__main__":
    main()
