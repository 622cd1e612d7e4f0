"""A decoder-only transformer, GPT-2 by default and every modern small-LM change one param away.

GPTConfig's defaults (and `-S recipe=baseline`) are GPT-2: token + learned position embeddings,
pre-LayerNorm blocks (causal self-attention through `F.scaled_dot_product_attention`, which
dispatches to FlashAttention on GPU, then a 4x GELU MLP), a final LayerNorm, and an LM head tied to
the token embedding. GPT-2 initialisation: std 0.02, residual output projections scaled by
1/sqrt(2 n_layer) so the residual stream's variance does not grow with depth.

Each axis below changes one thing and composes with the others:
  positions      learned | rope: rotary embeddings rotate q and k by their absolute position, so
                 attention scores depend only on the distance between tokens (Su et al., 2021)
  norm           layernorm | rmsnorm: scale by the root mean square only, no centring, no bias
  mlp            gelu | swiglu (gated: silu(x W_gate) * x W_fc) | relu2 (relu(x)^2, Primer)
  qk_norm        RMSNorm over each head's queries and keys before the rotation (bounded logits)
  tie_embeddings the LM head reuses the token embedding (GPT-2) or has its own matrix
  n_kv_head      grouped-query attention: key/value heads shared by n_head / n_kv_head query heads
  logit_softcap  cap * tanh(logits / cap) keeps every logit inside (-cap, cap) (Gemma 2)

Incremental decoding goes through a preallocated `KVCache`: `forward(new_tokens, kv_cache=cache)`
attends over everything cached so far (rotary positions continue at the cache's length) and gives
the same logits as a full forward over the whole sequence.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinylm.config import ModelParams
from tinylm.errors import PipelineError
from tinylm.files import sha256_file, write_bytes
from tinylm.records.io import plain, read_record, write_record
from tinylm.records.model import ModelSummary, TrainingSummary


POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
NORM_EPS = 1e-5  # LayerNorm's default, used for RMSNorm too


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0
    bias: bool = True
    positions: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    mlp: str = "gelu"
    mlp_hidden: int = 0  # 0: the default width of `mlp` (see mlp_width)
    qk_norm: bool = False
    tie_embeddings: bool = True
    n_kv_head: int = 0  # 0: as many as n_head (multi-head attention)
    logit_softcap: float = 0.0  # 0: off

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        for name, choices in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GPTConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rotary positions rotate pairs of dimensions, so the head size "
                             f"d_model / n_head must be even, got {self.head_dim}")
        if self.rope_theta <= 1:
            raise ValueError(f"GPTConfig.rope_theta must be > 1, got {self.rope_theta}")
        if self.mlp_hidden < 0 or self.n_kv_head < 0 or self.logit_softcap < 0:
            raise ValueError("GPTConfig.mlp_hidden, n_kv_head and logit_softcap must be >= 0 (0: default/off)")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    @classmethod
    def from_params(cls, model: ModelParams, vocab_size: int) -> GPTConfig:
        return cls(vocab_size=vocab_size, **dataclasses.asdict(model))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: mlp_hidden, or 4 * d_model; for SwiGLU, whose three matrices
        would otherwise hold 1.5x the parameters, 8/3 * d_model (rounded to a multiple of 8), so
        it costs what the 4x GELU MLP costs."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 8 * round(8 * self.d_model / 3 / 8)
        return 4 * self.d_model


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, vocab_size], float32
    loss: torch.Tensor | None  # mean cross-entropy over targets != -1
    hidden: torch.Tensor | None  # [B, T, d_model] after the final norm


class KVCache:
    """Keys and values of every layer for the positions decoded so far, preallocated to block_size.
    With grouped-query attention it holds only the n_kv_head shared heads: that is GQA's saving."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, config.kv_heads, config.block_size, config.head_dim)
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


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=NORM_EPS)
    return nn.LayerNorm(dim, eps=NORM_EPS, bias=config.bias)


class Rotary(nn.Module):
    """cos and sin of every position's rotation angles, position p turning dimension pair
    (i, i + head_dim/2) by p * theta^(-2i/head_dim) (the rotate-half layout of GPT-NeoX and Llama)."""

    def __init__(self, head_dim: int, block_size: int, theta: float):
        super().__init__()
        inverse_frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inverse_frequencies)
        # Not in the state dict: derived from the config, so old and new checkpoints stay alike.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def at(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[..., i], x[..., i + d/2]) of x [B, H, T, d] by the angles of cos/sin [T, d/2],
    in x's dtype (under bf16 autocast, as Llama does: a float32 detour costs more than it buys)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        kv_width = self.n_kv_head * self.head_dim
        self.split_sizes = [config.d_model, kv_width, kv_width]
        self.qkv = nn.Linear(config.d_model, config.d_model + 2 * kv_width, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if config.qk_norm else None

    def queries_keys_values(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, n_head, T, head_dim] and k, v [B, n_kv_head, T, head_dim], normed and rotated."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.split_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.q_norm is not None:
            # In q's dtype: under bf16 autocast q is bf16, and a bf16 input with the fp32 gain would
            # miss the fused kernel (measured 16% of the whole training step on CPU).
            q = F.rms_norm(q, (self.head_dim,), self.q_norm.weight.to(q.dtype), NORM_EPS)
            k = F.rms_norm(k, (self.head_dim,), self.k_norm.weight.to(k.dtype), NORM_EPS)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None, layer: int,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, rotary)
        offset = 0
        if kv_cache is not None:
            offset = kv_cache.length
            k, v = kv_cache.append(layer, k, v)
            # The cache has the model's dtype; under autocast q may be narrower.
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        # Query head h reads key/value head h // (n_head / n_kv_head), as if each were repeated.
        gqa = self.n_kv_head != self.n_head
        if offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        elif T == 1:
            # One new token sees every cached position: no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
        else:
            # is_causal aligns the triangle to the top-left corner, which is wrong once queries
            # start at `offset`; new token i (absolute position offset + i) sees keys 0..offset+i.
            query_pos = torch.arange(offset, offset + T, device=x.device)
            key_pos = torch.arange(offset + T, device=x.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        width = config.mlp_width
        self.fc = nn.Linear(config.d_model, width, bias=config.bias)
        self.gate = nn.Linear(config.d_model, width, bias=config.bias) if config.mlp == "swiglu" else None
        self.proj = nn.Linear(width, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(self.gate(x)) * h
        return self.dropout(self.proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        learned = config.positions == "learned"
        self.wpe = nn.Embedding(config.block_size, config.d_model) if learned else None
        self.rotary = None if learned else Rotary(config.head_dim, config.block_size, config.rope_theta)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One matrix embeds tokens and scores them (Press & Wolf, 2017).
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
        """Parameter count; a tied head/token matrix counts once. Without embeddings drops the
        token and position tables (the usual 'non-embedding' count for scaling laws); an untied
        LM head stays in, as the matrix every token's logits are computed with."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if not include_embeddings:
            total -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return total

    def new_kv_cache(self, batch_size: int) -> KVCache:
        weight = self.wte.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)

    def rotary_at(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotation of positions start..start+length-1, or None with learned positions."""
        return None if self.rotary is None else self.rotary.at(start, length)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, return_hidden: bool = False) -> GPTOutput:
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if kv_cache is not None and kv_cache.batch_size != B:
            raise ValueError(f"kv_cache holds {kv_cache.batch_size} rows but idx has {B}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        rotary = self.rotary_at(start, T)
        for layer, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, None, layer, rotary, use_reentrant=False)
            else:
                x = block(x, kv_cache, layer, rotary)
        if kv_cache is not None:
            kv_cache.length = start + T
        hidden = self.ln_f(x)
        logits = self.lm_head(hidden).float()
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return GPTOutput(logits, loss, hidden if return_hidden else None)


def save_model(model: GPT, path: str | Path, extra: dict[str, Any]) -> str:
    """Weights and config only (no optimizer), written atomically; the same weights give the same bytes.
    Returns the sha256 of the bytes written.

    torch.save names the zip archive's inner folder after the file it writes to, which for an
    atomic write is a random temp name; saved through a buffer, the folder is always `archive`,
    so DVC sees that a rerun which reproduced the weights reproduced the file.
    """
    payload = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(), "extra": extra}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = GPT(GPTConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location).eval()


def save_trained_model(model: GPT, directory: str | Path, summary: TrainingSummary) -> ModelSummary:
    """The pretrain stage's outputs: model.pt (the summary as its extra), then model.json, the summary and
    model.pt's sha256. In that order, a crash between the two leaves a model.json whose hash does not
    match the new weights: a reader refuses the pair instead of describing new weights with an old record."""
    directory = Path(directory)
    record = ModelSummary(**dataclasses.asdict(summary),
                          model_sha256=save_model(model, directory / "model.pt", extra=plain(summary)))
    write_record(directory / "model.json", record)
    return record


def load_trained_model(model_dir: str | Path, tokenizer_fingerprint: str, device: torch.device,
                       tokenizer_dir: str | Path = "data/tokenizer") -> GPT:
    """model.pt from the pretrain stage, once model.json shows it was trained on the ids of the tokenizer
    read from `tokenizer_dir` and model.pt's sha256 is the one model.json records.

    The hash is checked here, where the file is read, because the readers (the stages, `tinylm`,
    `tinylm --model DIR` outside any DVC repository) open the file directly: `dvc status` would notice
    a damaged file, but nothing runs it. Hashing the gpu profile's 115 MB takes 0.1-0.2 s (docs/integrity.md).
    """
    model_dir = Path(model_dir)
    weights = model_dir / "model.pt"
    summary = read_record(model_dir / "model.json", ModelSummary, "pretrain")
    if summary.tokenizer_fingerprint != tokenizer_fingerprint:
        raise PipelineError(f"{model_dir}: trained with tokenizer {summary.tokenizer_fingerprint[:16]}…, but "
                            f"{tokenizer_dir} is tokenizer {tokenizer_fingerprint[:16]}…: its ids would mean other "
                            "tokens. Fix: use the tokenizer the model was trained with, or train the model on this "
                            "one with `dvc repro pretrain`.")
    fix = "Fix: restore it with `dvc checkout data/model`, or train it again with `dvc repro pretrain`"
    try:
        digest = sha256_file(weights)
    except OSError as exc:
        raise PipelineError(f"{weights}: cannot be read ({exc.strerror or exc}). {fix}.") from None
    if digest != summary.model_sha256:
        raise PipelineError(f"{weights}: its sha256 is {digest[:16]}…, but {model_dir / 'model.json'} records "
                            f"{summary.model_sha256[:16]}…: the weights are damaged, or not the ones that record "
                            f"describes. {fix}.")
    try:
        return load_model(weights, map_location=device)
    except (RuntimeError, ValueError, TypeError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        # Its hash matched, so the record came with these bytes: written by another version of this code.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{weights}: cannot be loaded ({first_line}). {fix}.") from None
