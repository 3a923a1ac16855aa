"""Teacher-guided masking in the reference trainer (`TrainConfig.guide_margin`): the loop
passes the batch rows' teacher embeddings to the loss."""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_train_reference import config, pairs_path  # noqa: F401  (fixture)
from trainers.train.config import TrainConfig
from trainers.train.loop import train


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setenv("B3MINE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_guide_masks_in_the_loop(pairs_path, tmp_path):  # noqa: F811
    plain = train(config(pairs_path, tmp_path / "plain", steps=3))
    guided = train(config(pairs_path, tmp_path / "guided", steps=3, guide_margin=0.0))
    # Same first batch and initial model: masking only removes denominator terms.
    assert guided.losses[0] < plain.losses[0]
    # Unit-norm teacher vectors score in [-1, 1]: margin 2 masks every negative, so each row
    # and column keeps only its positive and the loss is exactly 0.
    everything = train(config(pairs_path, tmp_path / "all", steps=2, guide_margin=2.0))
    assert np.allclose(everything.losses, 0.0, atol=1e-6)


def test_guide_with_gradcache_and_hard_negatives_matches_plain_steps(pairs_path, tmp_path):  # noqa: F811
    kw = dict(steps=3, guide_margin=0.05, hard_negatives=True, sampler="plan")
    direct = train(config(pairs_path, tmp_path / "direct", **kw))
    cached = train(config(pairs_path, tmp_path / "cached", gradcache_chunk=8, **kw))
    np.testing.assert_allclose(cached.losses, direct.losses, rtol=1e-5)


def test_guide_needs_infonce():
    with pytest.raises(ValueError, match="needs objective='infonce'"):
        TrainConfig(guide_margin=0.0, objective="sogclr")
