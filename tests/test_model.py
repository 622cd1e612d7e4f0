"""The GPT model: KV-cache decoding equals the full forward, parameter counts, config checks, init."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tinylm.config import ModelParams
from tinylm.model import GPT, GPTConfig, load_model, save_model

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32, dropout=0.0, bias=True)


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(dataclasses.replace(TINY, **overrides)).eval()


def test_forward_shapes_and_loss_ignores_minus_one():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 10))
    targets = torch.randint(0, 97, (3, 10))
    out = model(idx, targets, return_hidden=True)
    assert out.logits.shape == (3, 10, 97) and out.logits.dtype == torch.float32
    assert out.hidden.shape == (3, 10, 32)
    expected = torch.nn.functional.cross_entropy(out.logits.view(-1, 97), targets.view(-1))
    torch.testing.assert_close(out.loss, expected)
    # Masked targets drop out of the mean.
    masked = targets.clone()
    masked[:, 5:] = -1
    partial = torch.nn.functional.cross_entropy(out.logits[:, :5].reshape(-1, 97), targets[:, :5].reshape(-1))
    torch.testing.assert_close(model(idx, masked).loss, partial)
    assert model(idx).loss is None and model(idx).hidden is None


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 97
    torch.testing.assert_close(model(idx).logits[:, :8], model(changed).logits[:, :8])


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 1, 7, 3, 3], [20]])
@pytest.mark.parametrize("bias", [True, False])
def test_kv_cache_matches_full_forward(chunks, bias):
    model = tiny_model(bias=bias)
    idx = torch.randint(0, 97, (3, sum(chunks)))
    full = model(idx, return_hidden=True)
    cache = model.new_kv_cache(batch_size=3)
    start = 0
    with torch.no_grad():
        for size in chunks:
            out = model(idx[:, start:start + size], kv_cache=cache, return_hidden=True)
            torch.testing.assert_close(out.logits, full.logits[:, start:start + size], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.hidden, full.hidden[:, start:start + size], atol=1e-5, rtol=1e-4)
            start += size
            assert cache.length == start


def test_kv_cache_reorder_selects_rows():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 9))
    cache = model.new_kv_cache(3)
    with torch.no_grad():
        model(idx[:, :6], kv_cache=cache)
        order = torch.tensor([2, 0, 0, 1])
        cache.reorder(order)
        step = model(idx[order, 6:], kv_cache=cache).logits
    torch.testing.assert_close(step, model(idx[order]).logits[:, 6:], atol=1e-5, rtol=1e-4)


def test_kv_cache_refuses_to_overflow_block_size():
    model = tiny_model()
    cache = model.new_kv_cache(1)
    with torch.no_grad():
        model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_param_counts_match_the_architecture():
    for bias in (True, False):
        c = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, d_model=32, bias=bias)
        model = GPT(c)
        d = c.d_model
        per_block = 12 * d * d + (3 * d + d + 4 * d + d if bias else 0)  # qkv, proj, fc, proj (+ biases)
        per_block += 2 * d * (2 if bias else 1)  # two LayerNorms
        final_ln = d * (2 if bias else 1)
        embeddings = c.vocab_size * d + c.block_size * d  # the head is tied: counted once
        assert model.num_params(include_embeddings=False) == c.n_layer * per_block + final_ln
        assert model.num_params() == c.n_layer * per_block + final_ln + embeddings
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_non_embedding_count_is_12_d_squared_per_layer_at_scale():
    config = GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, d_model=384)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params(include_embeddings=False) == pytest.approx(12 * 6 * 384**2, rel=0.01)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=3, d_model=32)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, d_model=32, dropout=1.0)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=0, n_head=4, d_model=32)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, d_model=32, n_kv_head=3)
    with pytest.raises(ValueError, match="even"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, d_model=12, positions="rope")
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, d_model=32, mlp="relu")
    params = ModelParams(n_layer=3, n_head=2, d_model=16, block_size=64, dropout=0.1, bias=False, positions="rope",
                         rope_theta=500.0, norm="rmsnorm", mlp="swiglu", mlp_hidden=40, qk_norm=True,
                         tie_embeddings=False, n_kv_head=1, logit_softcap=30.0)
    config = GPTConfig.from_params(params, vocab_size=300)
    assert (config.n_layer, config.n_head, config.d_model, config.block_size, config.vocab_size) == (3, 2, 16, 64, 300)
    assert config.dropout == 0.1 and config.bias is False
    assert (config.positions, config.rope_theta, config.norm, config.mlp, config.mlp_width) == ("rope", 500.0,
                                                                                               "rmsnorm", "swiglu", 40)
    assert (config.qk_norm, config.tie_embeddings, config.kv_heads, config.logit_softcap) == (True, False, 1, 30.0)


def test_gpt2_initialisation_std():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=2048, block_size=64, n_layer=8, n_head=4, d_model=256)
    model = GPT(config)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.03)
    scaled = 0.02 / math.sqrt(2 * config.n_layer)
    assert model.blocks[3].attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.03)
    assert model.blocks[3].mlp.proj.weight.std().item() == pytest.approx(scaled, rel=0.03)
    assert torch.count_nonzero(model.blocks[0].mlp.fc.bias) == 0


def test_dropout_only_in_train_mode():
    model = tiny_model(dropout=0.5)
    idx = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(model(idx).logits, model(idx).logits)
    model.train()
    assert not torch.allclose(model(idx).logits, model(idx).logits)


def test_activation_checkpointing_gives_the_same_gradients():
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for enabled in (False, True):
        model = tiny_model().train()
        model.activation_checkpointing = enabled
        model(idx, idx).loss.backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_bf16_autocast_forward_on_cpu():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, idx)
        cache = model.new_kv_cache(2)
        step = model(idx[:, :4], kv_cache=cache)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.loss)
    torch.testing.assert_close(step.logits, out.logits[:, :4], atol=0.1, rtol=0.05)


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_model(bias=False)
    path = tmp_path / "model.pt"
    save_model(model, path, extra={"tokens": 5})
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    idx = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(loaded(idx).logits, model(idx).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_the_same_weights_give_the_same_file_bytes(tmp_path):
    # torch.save names its archive folder after the file it writes; the atomic write's temp name is
    # random, so without care every save differs and DVC sees a new model on every rerun.
    model, copy = tiny_model(bias=True), tiny_model(bias=True)
    copy.load_state_dict(model.state_dict())
    extra = {"tokens": 5, "tokenizer_fingerprint": "f" * 64}
    save_model(model, tmp_path / "a" / "model.pt", extra=extra)
    save_model(copy, tmp_path / "b" / "other_name.pt", extra=dict(extra))
    save_model(model, tmp_path / "a" / "model.pt", extra=extra)  # overwriting: a new temp name
    first = (tmp_path / "a" / "model.pt").read_bytes()
    assert first == (tmp_path / "b" / "other_name.pt").read_bytes()
    with torch.no_grad():
        copy.wte.weight[0, 0] += 1e-3
    save_model(copy, tmp_path / "c.pt", extra=extra)
    assert (tmp_path / "c.pt").read_bytes() != first  # the bytes do follow the weights
