"""What the report reads from inside a model: attention probabilities, weight matrices, spectral norms."""
from __future__ import annotations

import pytest
import torch

from tinylm.report import introspection
from tinylm.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=2, d_model=16, dropout=0.0, bias=True)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def test_attention_probabilities_reproduce_each_attention_modules_output(model):
    tokens = torch.randint(0, CONFIG.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    probs = introspection.attention_probabilities(model, tokens)
    assert probs.shape == (CONFIG.n_layer, CONFIG.n_head, 20, 20)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(CONFIG.n_layer, CONFIG.n_head, 20), atol=1e-5)
    assert torch.all(probs.triu(diagonal=1) == 0)  # causal: nothing on future keys

    # Independently: the module's real output (fused kernel) must equal proj(probs @ v).
    seen = []
    hooks = [block.attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
             for block in model.blocks]
    with torch.no_grad():
        model(tokens[None])
    for hook in hooks:
        hook.remove()
    head_dim = CONFIG.d_model // CONFIG.n_head
    with torch.no_grad():
        for block, layer_probs, (x, out) in zip(model.blocks, probs, seen):
            v = x @ block.attn.qkv.weight[2 * CONFIG.d_model:].T + block.attn.qkv.bias[2 * CONFIG.d_model:]
            v = v.view(1, 20, CONFIG.n_head, head_dim).transpose(1, 2)
            mixed = (layer_probs[None] @ v).transpose(1, 2).reshape(1, 20, CONFIG.d_model)
            assert torch.allclose(block.attn.proj(mixed), out, atol=1e-5)


def test_attention_rejects_sequences_longer_than_the_block(model):
    with pytest.raises(ValueError, match="block_size"):
        introspection.attention_probabilities(model, torch.zeros(CONFIG.block_size + 1, dtype=torch.long))


def test_head_statistics_read_the_previous_and_first_token_columns():
    T = 5
    previous_head = torch.zeros(T, T)
    previous_head[0, 0] = 1
    previous_head[torch.arange(1, T), torch.arange(T - 1)] = 1
    first_head = torch.zeros(T, T)
    first_head[:, 0] = 1
    probs = torch.stack([previous_head, first_head])[None]  # [1 layer, 2 heads, T, T]
    assert introspection.attention_to_previous(probs).tolist() == [[1.0, 0.25]]  # query 1's previous token is 0
    assert introspection.attention_to_first(probs).tolist() == [[0.25, 1.0]]


def test_spectral_norms_are_the_largest_singular_value_of_each_matrix(model):
    norms = introspection.spectral_norms(model)
    state = model.state_dict()
    d = CONFIG.d_model
    expected_weights = {
        "attn.q": lambda l: state[f"blocks.{l}.attn.qkv.weight"][:d],
        "attn.k": lambda l: state[f"blocks.{l}.attn.qkv.weight"][d:2 * d],
        "attn.v": lambda l: state[f"blocks.{l}.attn.qkv.weight"][2 * d:],
        "attn.proj": lambda l: state[f"blocks.{l}.attn.proj.weight"],
        "mlp.fc": lambda l: state[f"blocks.{l}.mlp.fc.weight"],
        "mlp.proj": lambda l: state[f"blocks.{l}.mlp.proj.weight"],
    }
    assert list(norms) == list(expected_weights)
    for name, weight_of in expected_weights.items():
        assert len(norms[name]) == CONFIG.n_layer
        for layer in range(CONFIG.n_layer):
            weight = weight_of(layer)
            assert norms[name][layer] == pytest.approx(float(torch.linalg.matrix_norm(weight, ord=2)), rel=1e-5)
            # and it is the top singular value, not another norm
            assert norms[name][layer] == pytest.approx(float(torch.linalg.svdvals(weight)[0]), rel=1e-4)


def test_weight_matrices_cover_every_matrix_once(model):
    matrices = introspection.weight_matrices(model)
    assert [m.name for m in matrices[:2]] == ["wte", "wpe"]
    assert len(matrices) == 2 + CONFIG.n_layer * len(introspection.LAYER_MATRICES)
    listed = sum(m.weight.numel() for m in matrices)
    every_2d = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # the tied head appears once
    assert listed == every_2d
