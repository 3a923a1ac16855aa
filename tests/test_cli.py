"""The b3mine command, run as a user would: a real process."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

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
    assert r.returncode == 2 and "--batch-size must be a multiple of --cluster-size" in r.stderr
    assert list_plans(tmp_path) == []


def cli(capsys, *args: str) -> tuple[int, str]:
    """``b3mine ARGS`` in this process: (exit code, stderr)."""
    import pytest

    from b3mine.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code, capsys.readouterr().err


def test_config_mistakes_are_one_line_naming_the_flag(tmp_path, capsys):
    base = ("mine", "--embeddings", str(tmp_path / "missing.parquet"), "--out", str(tmp_path))
    cases = {
        ("--batch-size", "1000", "--cluster-size", "32"):
            "error: --batch-size must be a multiple of --cluster-size "
            "(got --batch-size=1000, --cluster-size=32)",
        ("--algorithm", "kmeans"):
            "error: --algorithm 'kmeans': expected one of 'metis', 'kaminpar', 'louvain', "
            "'igraph-louvain' or 'leiden'",
        ("--index", "faiss"):
            "error: --index 'faiss': expected one of 'flat', 'ivf', 'hnsw' or 'torch'",
        ("--p", "-1"): "error: --p -1: expected a number >= 0",
        ("--negatives", "x", "--k-neg", "0"):
            "error: --negatives 'x': expected one of 'none', 'hnps' or 'hnips'; "
            "--k-neg 0: expected a number >= 1",
    }
    for flags, line in cases.items():
        code, stderr = cli(capsys, *base, *flags)
        assert (code, stderr.strip()) == (2, line), flags
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"neighbours": {"index": "faiss"}}))
    code, stderr = cli(capsys, *base, "--config", str(cfg))
    assert (code, stderr.strip()) == (2, f"error: --config {cfg}: neighbours.index 'faiss': "
                                         "expected one of 'flat', 'ivf', 'hnsw' or 'torch'")
    bad = tmp_path / "cfg.toml"
    bad.write_text("p = [")
    code, stderr = cli(capsys, *base, "--config", str(bad))
    assert code == 2 and stderr.startswith(f"error: file {bad}: not valid TOML")
    assert list_plans(tmp_path) == []


def test_train_config_mistakes_name_the_flag(tmp_path, capsys):
    code, stderr = cli(capsys, "train", "--sampler", "fifo", "--output-dir", str(tmp_path / "r"))
    assert (code, stderr.strip()) == (
        2, "error: --sampler 'fifo': expected one of 'plan', 'random' or 'kmeans'")
    code, stderr = cli(capsys, "train", "--batch-size", "30", "--cluster-size", "8",
                       "--adapter-steps", "-2", "--output-dir", str(tmp_path / "r"))
    assert code == 2 and stderr.count("\n") == 1
    assert "--adapter-steps -2: expected a number >= 0" in stderr
    assert not (tmp_path / "r").exists()


def report_text(monkeypatch, plan_dir) -> str:
    import io

    from rich.console import Console

    import b3mine.cli

    buffer = io.StringIO()
    monkeypatch.setattr(b3mine.cli, "console", Console(file=buffer, width=400))
    b3mine.cli.print_report(plan_dir)
    return buffer.getvalue()


def test_a_window_deeper_than_the_data(tmp_path, monkeypatch):
    import pytest

    from b3mine.config import MiningConfig, NegativesConfig
    from b3mine.embeddings import Embeddings
    from b3mine.errors import InputError
    from b3mine.mining import mine
    from tests.conftest import clustered_vectors

    emb = Embeddings.from_arrays(np.arange(200), clustered_vectors(200, 16, 5, seed=1))
    # one check (MiningConfig.check_fits) for every engine: a window that cannot fit is refused
    for p, m in ((200, 3), (30, 300)):
        with pytest.raises(InputError, match=r"the rank window \[p, p\+m\) does not fit in the "
                                             rf"rows \(expected p \+ m <= 200 rows, got p={p}, "
                                             rf"m={m}\)"):
            mine(emb, MiningConfig(batch_size=32, cluster_size=8, p=p, m=m), tmp_path)
    plan = mine(emb, MiningConfig(batch_size=32, cluster_size=8, p=30, m=100,
                                  batch_grouping="affinity",
                                  negatives=NegativesConfig(mode="hnps", k=2)), tmp_path)
    text = report_text(monkeypatch, plan.path)
    # One hardness format for every plan: the difference of mean in-batch similarities.
    q = plan.manifest.stats["quality"]
    assert (f"mean in-batch similarity {q['plan_mean']:+.4f} vs {q['random_mean']:+.4f} "
            f"random: {q['mean_similarity_gain']:+.4f}") in text
    assert "x 1 epoch;" in text
    assert "affinity grouping" in text and "HNPS k=2" in text
    assert "warning" not in text


def test_mine_help_shows_the_defaults(capsys):
    from b3mine.config import MiningConfig

    import pytest

    from b3mine.cli import main

    with pytest.raises(SystemExit) as info:
        main(["mine", "--help"])
    code = info.value.code
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())  # rich wraps the help
    d = MiningConfig()
    assert code == 0
    for flag, value in (("batch-size", d.batch_size), ("cluster-size", d.cluster_size),
                        ("p", d.p), ("m", d.m), ("algorithm", d.algorithm),
                        ("index", d.neighbours.index), ("k-neg", d.negatives.k)):
        assert f"(default {value})" in out.split(f"--{flag} ", 1)[1][:300], flag
