"""A GPT-2 style decoder-only transformer, written out so every line can be read.

Token + learned position embeddings, pre-LayerNorm blocks (causal self-attention through
`F.scaled_dot_product_attention`, which dispatches to FlashAttention on GPU, then a 4x GELU MLP),
a final LayerNorm, and an LM head tied to the token embedding. GPT-2 initialisation: std 0.02,
residual output projections scaled by 1/sqrt(2 n_layer) so the residual stream's variance does
not grow with depth.

Incremental decoding goes through a preallocated `KVCache`: `forward(new_tokens, kv_cache=cache)`
attends over everything cached so far and gives the same logits as a full forward over the
whole sequence.
"""
from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinylm.config import ModelParams
from tinylm.errors import PipelineError
from tinylm.files import write_bytes
from tinylm.records.io import read_record
from tinylm.records.model import ModelSummary


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_params(cls, model: ModelParams, vocab_size: int) -> GPTConfig:
        return cls(vocab_size=vocab_size, block_size=model.block_size, n_layer=model.n_layer,
                   n_head=model.n_head, d_model=model.d_model, dropout=model.dropout, bias=model.bias)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, vocab_size], float32
    loss: torch.Tensor | None  # mean cross-entropy over targets != -1
    hidden: torch.Tensor | None  # [B, T, d_model] after the final LayerNorm


class KVCache:
    """Keys and values of every layer for the positions decoded so far, preallocated to block_size."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.block_size = config.block_size
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values after the cached ones; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` in that order (beam search: a row may appear several times)."""
        index = index.to(self.keys[0].device)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        offset = 0
        if kv_cache is not None:
            offset = kv_cache.length
            k, v = kv_cache.append(layer, k, v)
            # The cache has the model's dtype; under autocast q may be narrower.
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # One new token sees every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # is_causal aligns the triangle to the top-left corner, which is wrong once queries
            # start at `offset`; new token i (absolute position offset + i) sees keys 0..offset+i.
            query_pos = torch.arange(offset, offset + T, device=x.device)
            key_pos = torch.arange(offset + T, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Weight tying: one matrix embeds tokens and scores them (Press & Wolf, 2017).
        self.lm_head.weight = self.wte.weight
        # Recompute each block's activations in the backward pass instead of storing them:
        # less memory for ~30% more compute. The trainer switches it on from train params.
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count; the tied head/token matrix counts once. Without embeddings drops
        both the token and the position tables (the usual 'non-embedding' count for scaling laws)."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if not include_embeddings:
            total -= self.wte.weight.numel() + self.wpe.weight.numel()
        return total

    def new_kv_cache(self, batch_size: int) -> KVCache:
        weight = self.wte.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, return_hidden: bool = False) -> GPTOutput:
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"kv_cache holds {kv_cache.batch_size} rows but idx has {B}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for layer, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length = start + T
        hidden = self.ln_f(x)
        logits = self.lm_head(hidden).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return GPTOutput(logits, loss, hidden if return_hidden else None)


def save_model(model: GPT, path: str | Path, extra: dict[str, Any]) -> None:
    """Weights and config only (no optimizer), written atomically; the same weights give the same bytes.

    torch.save names the zip archive's inner folder after the file it writes to, which for an
    atomic write is a random temp name; saved through a buffer, the folder is always `archive`,
    so DVC sees that a rerun which reproduced the weights reproduced the file.
    """
    payload = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(), "extra": extra}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes(path, buffer.getvalue())


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = GPT(GPTConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval()


def load_trained_model(model_dir: str | Path, tokenizer_fingerprint: str, device: torch.device) -> GPT:
    """model.pt from the pretrain stage, once model.json shows it was trained on this tokenizer's ids."""
    model_dir = Path(model_dir)
    fix = "Fix: run `dvc repro pretrain`"
    summary = read_record(model_dir / "model.json", ModelSummary, "pretrain")
    try:
        model = load_model(model_dir / "model.pt", map_location=device)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{model_dir}: cannot load the trained model ({exc}). {fix}.") from None
    if summary.tokenizer_fingerprint != tokenizer_fingerprint:
        raise PipelineError(f"{model_dir}: trained with tokenizer {summary.tokenizer_fingerprint[:16]}…, but "
                            f"data/tokenizer is {tokenizer_fingerprint[:16]}…: its ids would mean other tokens. "
                            f"{fix}.")
    return model
