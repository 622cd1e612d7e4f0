"""What the report shows from inside a trained GPT: attention probabilities and weight matrices.

The model computes attention with `F.scaled_dot_product_attention`, which never materialises the
probabilities. So forward pre-hooks catch each attention module's input (the block's norm output)
during one ordinary forward, and the probabilities are recomputed from it with the module's own
queries and keys (its projection, QK-norm and rotary positions, each key/value head repeated for
the query heads that share it): softmax(q k^T / sqrt(head_dim)) under the causal mask, exactly
the math the fused kernel does. The model's code is left untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinylm.model import GPT, CausalSelfAttention


def layer_matrices(model: GPT) -> tuple[str, ...]:
    """The per-layer matrices, in the order a token's residual stream meets them."""
    mlp = ("mlp.gate", "mlp.fc", "mlp.proj") if model.config.mlp == "swiglu" else ("mlp.fc", "mlp.proj")
    return ("attn.q", "attn.k", "attn.v", "attn.proj", *mlp)


def _attention_from_input(model: GPT, attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Probabilities [B, n_head, T, T] that `attn` assigns when its input is x [B, T, d_model]."""
    T = x.shape[1]
    q, k, _ = attn.queries_keys_values(x, model.rotary_at(0, T))
    k = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # query head h reads kv head h // group
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


@torch.inference_mode()
def attention_probabilities(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """Attention of every head of every layer on one sequence: [n_layer, n_head, T, T] float32 on
    the CPU; row i holds how query position i spreads its attention over key positions 0..i."""
    if tokens.dim() != 1 or len(tokens) < 1:
        raise ValueError(f"give one sequence of token ids (1-D, non-empty), got shape {tuple(tokens.shape)}")
    if len(tokens) > model.config.block_size:
        raise ValueError(f"{len(tokens)} tokens exceed the model's block_size {model.config.block_size}")
    inputs: list[torch.Tensor] = []
    handles = [block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
               for block in model.blocks]
    was_training = model.training
    try:
        model.eval()
        model(tokens[None].to(model.wte.weight.device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    probs = [_attention_from_input(model, block.attn, x.float())[0] for block, x in zip(model.blocks, inputs)]
    return torch.stack(probs).cpu()


@dataclass(frozen=True)
class WeightMatrix:
    name: str  # one of layer_matrices(model), or "wte" / "wpe" / "lm_head"
    layer: int | None  # None for the embeddings and the head, which belong to no layer
    weight: torch.Tensor  # [out, in] as the module applies it (a view of the model's parameter)


def weight_matrices(model: GPT) -> list[WeightMatrix]:
    """Every 2-D weight: the embeddings (and an untied LM head), then per layer q, k, v (the parts
    of the fused qkv projection, each its own linear map), the attention output, the MLP's matrices.
    A tied LM head is the token embedding, so it is not listed twice."""
    matrices = [WeightMatrix("wte", None, model.wte.weight.detach())]
    if model.wpe is not None:
        matrices.append(WeightMatrix("wpe", None, model.wpe.weight.detach()))
    if not model.config.tie_embeddings:
        matrices.append(WeightMatrix("lm_head", None, model.lm_head.weight.detach()))
    for layer, block in enumerate(model.blocks):
        q, k, v = block.attn.qkv.weight.detach().split(block.attn.split_sizes, dim=0)
        by_name = {"attn.q": q, "attn.k": k, "attn.v": v, "attn.proj": block.attn.proj.weight.detach(),
                   "mlp.fc": block.mlp.fc.weight.detach(), "mlp.proj": block.mlp.proj.weight.detach()}
        if block.mlp.gate is not None:
            by_name["mlp.gate"] = block.mlp.gate.weight.detach()
        matrices += [WeightMatrix(name, layer, by_name[name]) for name in layer_matrices(model)]
    return matrices


def spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value: the most any unit input vector can be stretched by this map."""
    return float(torch.linalg.matrix_norm(weight.float(), ord=2))


def spectral_norms(model: GPT) -> dict[str, list[float]]:
    """Per matrix name in layer_matrices(model), the spectral norm of that matrix in each layer."""
    norms: dict[str, list[float]] = {name: [] for name in layer_matrices(model)}
    for matrix in weight_matrices(model):
        if matrix.layer is not None:
            norms[matrix.name].append(spectral_norm(matrix.weight))
    return norms


def attention_to_previous(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention each head puts on the token just before the query: [n_layer, n_head].
    High in a "previous-token head", the half of an induction circuit a small model learns first.
    Query 0 has no previous token and is left out."""
    return probs.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=-1)


def attention_to_first(probs: torch.Tensor) -> torch.Tensor:
    """Mean attention each head puts on position 0 from queries 1..T-1: [n_layer, n_head]. High in an
    "attention sink" head, which parks probability mass on the first token when it has nothing to fetch."""
    return probs[..., 1:, 0].mean(dim=-1)
