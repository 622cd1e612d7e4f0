"""What the report shows from inside a trained GPT: attention probabilities and weight matrices.

The model computes attention with `F.scaled_dot_product_attention`, which never materialises the
probabilities. So forward pre-hooks catch each attention module's input (the block's LayerNorm
output) during one ordinary forward, and the probabilities are recomputed from it with the
module's own q/k projection: softmax(q k^T / sqrt(head_dim)) under the causal mask, exactly the
math the fused kernel does. The model's code is left untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinylm.model import GPT, CausalSelfAttention

# The per-layer matrices, in the order a token's residual stream meets them.
LAYER_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj")


def _attention_from_input(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Probabilities [B, n_head, T, T] that `attn` assigns when its input is x [B, T, d_model]."""
    B, T, C = x.shape
    q, k, _ = attn.qkv(x).split(C, dim=2)
    q, k = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // attn.n_head)
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
    probs = [_attention_from_input(block.attn, x.float())[0] for block, x in zip(model.blocks, inputs)]
    return torch.stack(probs).cpu()


@dataclass(frozen=True)
class WeightMatrix:
    name: str  # one of LAYER_MATRICES, or "wte" / "wpe"
    layer: int | None  # None for the embeddings, which belong to no layer
    weight: torch.Tensor  # [out, in] as the module applies it (a view of the model's parameter)


def weight_matrices(model: GPT) -> list[WeightMatrix]:
    """Every 2-D weight: the embeddings, then per layer q, k, v (the three thirds of the fused
    qkv projection, each its own linear map), the attention output, the MLP's two matrices.
    The LM head is the token embedding (tied), so it is not listed twice."""
    d = model.config.d_model
    matrices = [WeightMatrix("wte", None, model.wte.weight.detach()),
                WeightMatrix("wpe", None, model.wpe.weight.detach())]
    for layer, block in enumerate(model.blocks):
        qkv = block.attn.qkv.weight.detach()
        by_name = {"attn.q": qkv[:d], "attn.k": qkv[d:2 * d], "attn.v": qkv[2 * d:],
                   "attn.proj": block.attn.proj.weight.detach(), "mlp.fc": block.mlp.fc.weight.detach(),
                   "mlp.proj": block.mlp.proj.weight.detach()}
        matrices += [WeightMatrix(name, layer, by_name[name]) for name in LAYER_MATRICES]
    return matrices


def spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value: the most any unit input vector can be stretched by this map."""
    return float(torch.linalg.matrix_norm(weight.float(), ord=2))


def spectral_norms(model: GPT) -> dict[str, list[float]]:
    """Per matrix name in LAYER_MATRICES, the spectral norm of that matrix in each layer."""
    norms: dict[str, list[float]] = {name: [] for name in LAYER_MATRICES}
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
