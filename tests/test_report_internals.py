"""What the report reads from inside a model: attention probabilities, weight matrices, spectral norms."""
from __future__ import annotations

import pytest
import torch

from tinylm.report import introspection
from tinylm.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=50, block_size=24, n_layer=3, n_head=2, d_model=16, dropout=0.0, bias=True)
# Every axis that changes how queries and keys are made or which matrices exist.
MODERN = GPTConfig(vocab_size=50, block_size=24, n_layer=2, n_head=4, d_model=32, bias=True, positions="rope",
                   norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, n_kv_head=2)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@pytest.mark.parametrize("config", [CONFIG, MODERN], ids=["gpt2", "rope-qknorm-gqa"])
def test_attention_probabilities_reproduce_each_attention_modules_output(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # non-trivial norm gains, so QK-norm's weights matter
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, config.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    probs = introspection.attention_probabilities(model, tokens)
    assert probs.shape == (config.n_layer, config.n_head, 20, 20)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(config.n_layer, config.n_head, 20), atol=1e-5)
    assert torch.all(probs.triu(diagonal=1) == 0)  # causal: nothing on future keys

    # Independently: the module's real output (fused kernel) must equal proj(probs @ v).
    seen = []
    hooks = [block.attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
             for block in model.blocks]
    with torch.no_grad():
        model(tokens[None])
    for hook in hooks:
        hook.remove()
    head_dim, kv_width = config.head_dim, config.kv_heads * config.head_dim
    with torch.no_grad():
        for block, layer_probs, (x, out) in zip(model.blocks, probs, seen):
            start = config.d_model + kv_width  # v: the last kv_width rows of the fused projection
            v = x @ block.attn.qkv.weight[start:].T + block.attn.qkv.bias[start:]
            v = v.view(1, 20, config.kv_heads, head_dim).transpose(1, 2)
            v = v.repeat_interleave(config.n_head // config.kv_heads, dim=1)
            mixed = (layer_probs[None] @ v).transpose(1, 2).reshape(1, 20, config.d_model)
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
    assert list(norms) == list(expected_weights) == list(introspection.layer_matrices(model))
    for name, weight_of in expected_weights.items():
        assert len(norms[name]) == CONFIG.n_layer
        for layer in range(CONFIG.n_layer):
            weight = weight_of(layer)
            assert norms[name][layer] == pytest.approx(float(torch.linalg.matrix_norm(weight, ord=2)), rel=1e-5)
            # and it is the top singular value, not another norm
            assert norms[name][layer] == pytest.approx(float(torch.linalg.svdvals(weight)[0]), rel=1e-4)


@pytest.mark.parametrize("config, embeddings", [(CONFIG, ["wte", "wpe"]), (MODERN, ["wte", "lm_head"])],
                         ids=["gpt2", "rope-swiglu-untied"])
def test_weight_matrices_cover_every_matrix_once(config, embeddings):
    model = GPT(config)
    matrices = introspection.weight_matrices(model)
    assert [m.name for m in matrices[:len(embeddings)]] == embeddings
    per_layer = introspection.layer_matrices(model)
    assert ("mlp.gate" in per_layer) == (config.mlp == "swiglu")
    assert len(matrices) == len(embeddings) + config.n_layer * len(per_layer)
    listed = sum(m.weight.numel() for m in matrices)
    every_2d = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # a tied head appears once
    assert listed == every_2d
    k = next(m for m in matrices if m.name == "attn.k")
    assert k.weight.shape == (config.kv_heads * config.head_dim, config.d_model)
