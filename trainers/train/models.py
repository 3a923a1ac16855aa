"""Dual encoders: one shared tower for queries and targets, unit-norm outputs.

* `StudentEncoder`: mean of learned token embeddings (``EmbeddingBag``) over the MiniLM
  vocabulary, then a linear layer. Trained from scratch; one step at batch 128 takes a few
  milliseconds on CPU, which is what lets the quality benchmark run 18 trainings in minutes.
* `StaticEncoder`: the model2vec distillation of the packaged teacher (`trainers.static`): a
  pretrained mean of token vectors, fine-tuned. As fast as the student, starting near the teacher.
* `MiniLMEncoder`: the packaged all-MiniLM-L6-v2 (6-layer BERT, mean pooling), fine-tuned.

Both take a (n, L) int64 tensor of 0-padded token ids (as `trainers.train.data` stores them).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.train.config import TrainConfig

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0  # BERT uncased vocabulary (all-MiniLM-L6-v2)


class StudentEncoder(nn.Module):
    """Bag of word pieces -> mean embedding -> linear projection.

    ``vocab`` lists the word-piece ids the student learns (those of the train texts): the
    others, and [CLS]/[SEP] (in every text, they only dilute a mean), map to [PAD] and are left
    out. A word piece that never occurs in training would keep its random initial vector and
    only add noise, and the small table (~4.6k of 30.5k rows on the demo corpus) makes the
    optimizer step 6x cheaper."""

    def __init__(self, vocab_size: int, dim: int = 256, out_dim: int = 256,
                 vocab: Tensor | None = None) -> None:
        super().__init__()
        if vocab is None:
            vocab = torch.arange(1, vocab_size)
        vocab = vocab[(vocab != PAD_ID) & (vocab != CLS_ID) & (vocab != SEP_ID)].unique()
        remap = torch.zeros(vocab_size, dtype=torch.long)
        remap[vocab] = torch.arange(1, len(vocab) + 1)
        self.register_buffer("remap", remap)
        # padding_idx: [PAD] rows are left out of the mean (and never updated).
        self.bag = nn.EmbeddingBag(len(vocab) + 1, dim, mode="mean", padding_idx=PAD_ID)
        self.proj = nn.Linear(dim, out_dim)
        nn.init.normal_(self.bag.weight, std=0.1)
        with torch.no_grad():
            self.bag.weight[PAD_ID].zero_()

    @property
    def out_dim(self) -> int:
        return self.proj.out_features

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.bag(self.remap[tokens]))


class StaticEncoder(nn.Module):
    """Mean of pretrained static token vectors (no projection), as `StaticEmbedding` computes it.

    ``table`` (V, d) is indexed by the static model's own token ids; ``remap`` (vocab_size,)
    maps each teacher-tokenizer id (what `trainers.train.data` stores) to its row, -1 for
    tokens it lacks and for [PAD]/[CLS]/[SEP] (sentence-transformers' `StaticEmbedding`
    tokenizes without special tokens). Only the rows of ``trainable`` teacher ids (the word
    pieces of the train texts) are parameters; the others stay frozen at their pretrained
    values. That is the same model as training the whole table (the other rows get no gradient)
    but for AdamW's weight decay, which would shrink rows the data never touches, and it makes
    the optimizer step ~6x cheaper."""

    def __init__(self, table: Tensor, remap: Tensor, trainable: Tensor | None = None) -> None:
        super().__init__()
        remap = remap.clone()
        remap[[PAD_ID, CLS_ID, SEP_ID]] = -1
        known = remap >= 0
        train_mask = torch.zeros_like(known)
        train_mask[trainable if trainable is not None else torch.arange(len(remap))] = True
        train_mask &= known
        frozen_mask = known & ~train_mask
        # Two index maps from teacher ids, 0 = "not in this table" (a zero padding row).
        t_idx, f_idx = torch.zeros_like(remap), torch.zeros_like(remap)
        t_idx[train_mask] = torch.arange(1, int(train_mask.sum()) + 1)
        f_idx[frozen_mask] = torch.arange(1, int(frozen_mask.sum()) + 1)
        self.register_buffer("t_idx", t_idx)
        self.register_buffer("f_idx", f_idx)
        zero = table.new_zeros(1, table.shape[1])
        self.trainable = nn.EmbeddingBag.from_pretrained(
            torch.cat([zero, table[remap[train_mask]]]), freeze=False, mode="sum", padding_idx=0)
        self.register_buffer("frozen", torch.cat([zero, table[remap[frozen_mask]]]))

    @property
    def out_dim(self) -> int:
        return int(self.frozen.shape[1])

    def forward(self, tokens: Tensor) -> Tensor:
        ti, fi = self.t_idx[tokens], self.f_idx[tokens]
        count = ((ti > 0) | (fi > 0)).sum(1, keepdim=True).clamp(min=1)
        total = self.trainable(ti) + F.embedding_bag(fi, self.frozen, mode="sum", padding_idx=0)
        return total / count


def static_backbone(dim: int, vocab_size: int, trainable: Tensor | None) -> StaticEncoder:
    """The cached distillation (`trainers.static`) as a `StaticEncoder` over the teacher's ids."""
    from tokenizers import Tokenizer

    from trainers.static import load_static_student
    from trainers.train.data import tokenizer_path

    module = load_static_student(dim)[0]
    teacher_vocab = Tokenizer.from_file(str(tokenizer_path())).get_vocab()
    static_vocab = module.tokenizer.get_vocab()
    remap = torch.full((vocab_size,), -1, dtype=torch.long)
    for token, i in teacher_vocab.items():
        if i < vocab_size and token in static_vocab:
            remap[i] = static_vocab[token]
    return StaticEncoder(module.embedding.weight.detach().float(), remap, trainable)


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2 from the local package (offline), mean-pooled as sentence-transformers
    does it."""

    def __init__(self) -> None:
        super().__init__()
        from b3mine.demo import load_teacher

        st = load_teacher()
        self.transformer = st[0].auto_model  # the HF BertModel inside the ST Transformer module

    @property
    def out_dim(self) -> int:
        return int(self.transformer.config.hidden_size)

    def forward(self, tokens: Tensor) -> Tensor:
        width = int((tokens != PAD_ID).sum(1).max())  # trim padding: attention is quadratic
        tokens = tokens[:, :width]
        mask = (tokens != PAD_ID).long()
        hidden = self.transformer(input_ids=tokens, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class DualEncoder(nn.Module):
    """Shared tower for both sides; `encode` returns L2-normalised embeddings.

    With an ``adapter`` (three-phase training, ALGORITHMS.md §6) the tower is
    ``normalize(adapter(backbone(x)))``; the adapter is a square linear map that starts as the
    identity, so adding it changes nothing until it is trained."""

    def __init__(self, backbone: nn.Module, adapter: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter

    @property
    def out_dim(self) -> int:
        return int(self.backbone.out_dim)  # type: ignore[arg-type]

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.backbone(tokens)
        if self.adapter is not None:
            h = self.adapter(h)
        return F.normalize(h, dim=-1)

    encode = forward

    @torch.no_grad()
    def embed(self, tokens: Tensor, batch_size: int = 512) -> Tensor:
        """Eval-mode embeddings of many texts, in chunks."""
        was = self.training
        self.eval()
        try:
            return torch.cat([self(tokens[i : i + batch_size])
                              for i in range(0, len(tokens), batch_size)])
        finally:
            self.train(was)


def build_model(config: TrainConfig, vocab_size: int,
                train_tokens: tuple[np.ndarray, ...] = ()) -> DualEncoder:
    """The configured dual encoder; the student's vocabulary (the static student's trainable
    rows) is the word pieces of ``train_tokens`` (all of the tokenizer's when empty)."""
    vocab = (torch.as_tensor(np.unique(np.concatenate([t.ravel() for t in train_tokens])),
                             dtype=torch.long) if train_tokens else None)
    if config.model == "student":
        backbone: nn.Module = StudentEncoder(vocab_size, config.student_dim, config.embed_dim,
                                             vocab)
    elif config.model == "static":
        backbone = static_backbone(config.static_dim, vocab_size, vocab)
    elif config.model == "minilm":
        backbone = MiniLMEncoder()
    else:
        raise ValueError(f"unknown model {config.model!r}")
    adapter = None
    if config.adapter.adapter_steps or config.adapter.transfer_steps:
        d = int(backbone.out_dim)  # type: ignore[arg-type]
        adapter = nn.Linear(d, d)
        with torch.no_grad():
            adapter.weight.copy_(torch.eye(d))
            adapter.bias.zero_()
    return DualEncoder(backbone, adapter)
