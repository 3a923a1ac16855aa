"""The b3mine command, run as a user would: a real process."""
from __future__ import annotations

import json
import subprocess
import sys

from b3mine import list_plans


def b3mine(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "b3mine.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_mine_then_report(tmp_path, corpus_path):
    out = tmp_path / "plans"
    r = b3mine("mine", "--embeddings", str(corpus_path), "--out", str(out), "--batch-size", "128",
               "--cluster-size", "16", "--p", "3", "--m", "20", "--algorithm", "metis",
               "--negatives", "hnps", "--k-neg", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    (plan,) = list_plans(out)
    plan.validate()
    assert plan.config.seed == 3 and plan.config.negatives.k == 2
    assert "hardness" in r.stdout and plan.plan_id in r.stdout
    r = b3mine("report", str(plan.path), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["manifest"]["plan_id"] == plan.plan_id
    assert data["report"]["plan"]["mean"] > data["report"]["random"]["mean"]


def test_config_file_and_flag_override(tmp_path, corpus_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"batch_size": 64, "cluster_size": 8, "p": 2, "m": 10,
                               "neighbours": {"index": "hnsw"}}))
    r = b3mine("mine", "--embeddings", str(corpus_path), "--out", str(tmp_path / "p"),
               "--config", str(cfg), "--cluster-size", "16")
    assert r.returncode == 0, r.stderr
    (plan,) = list_plans(tmp_path / "p")
    assert plan.config.cluster_size == 16 and plan.config.neighbours.index == "hnsw"


def test_bad_input_is_a_clear_error(tmp_path, corpus_path):
    r = b3mine("mine", "--embeddings", str(corpus_path), "--out", str(tmp_path), "--column", "vec")
    assert r.returncode == 2
    assert "column 'vec': missing column" in r.stderr
    assert "Traceback" not in r.stderr
    r = b3mine("mine", "--embeddings", str(corpus_path), "--out", str(tmp_path),
               "--batch-size", "100", "--cluster-size", "32")
    assert r.returncode != 0 and "multiple of cluster_size" in r.stderr
    assert list_plans(tmp_path) == []
