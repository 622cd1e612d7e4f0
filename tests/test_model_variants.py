"""The model's architecture axes, each against an independent computation of what it claims to be:
rotary embeddings against complex multiplication, RMSNorm and the MLPs against their formulas,
grouped-query attention against multi-head attention with repeated key/value heads, the soft cap
against tanh of an uncapped model; and, for every variant, KV-cache decoding, save/load, activation
checkpointing and the decoding strategies. An old GPT-2 checkpoint must still load bit for bit."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinylm.generation.sampling import Greedy, Sample, decode, generate
from tinylm.generation.search import Beam, Contrastive
from tinylm.model import MLP, GPT, GPTConfig, Rotary, apply_rotary, load_model, make_norm, save_model


VOCAB = 61
BASE = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, d_model=32, dropout=0.0, bias=True)
MODERN = dict(positions="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False, n_kv_head=2,
              logit_softcap=5.0)

# Each axis alone, then all of them together (with each non-GELU MLP).
VARIANTS = {
    "gpt2": {},
    "rope": dict(positions="rope"),
    "rope_theta_500": dict(positions="rope", rope_theta=500.0),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "relu2": dict(mlp="relu2"),
    "mlp_hidden_40": dict(mlp_hidden=40),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "softcap": dict(logit_softcap=5.0),
    "modern": MODERN,
    "modern_relu2_no_bias": dict(MODERN, mlp="relu2", bias=False),
}


def config(**overrides) -> GPTConfig:
    return dataclasses.replace(BASE, **overrides)


def peaked(model: GPT, std: float = 0.3, seed: int = 0) -> GPT:
    """Redraw every matrix with a large std: GPT-2's 0.02 init gives near-uniform attention and
    near-zero logits, under which a wrong key/value head, position or cap would hardly show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * std)
            elif weight.dim() == 1:  # norm gains and biases away from 1 and 0, so they count too
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


def variant_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return peaked(GPT(config(**overrides))).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ rotary


def complex_rotation(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as Su et al. write it: the pair (x_i, x_{i+d/2}) is the complex number x_i + j x_{i+d/2},
    multiplied by exp(j * position * theta^(-2i/d)); computed in float64, apart from the model's code."""
    d = x.shape[-1]
    x = x.double()
    z = torch.complex(x[..., :d // 2], x[..., d // 2:])
    frequencies = theta ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    angles = positions.double()[:, None] * frequencies[None, :]  # [T, d/2]
    turned = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([turned.real, turned.imag], dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
@pytest.mark.parametrize("head_dim", [8, 16])
def test_rotary_equals_complex_multiplication(theta, head_dim):
    T = 32
    x = torch.randn(2, 3, T, head_dim, generator=torch.Generator().manual_seed(1))
    rotary = Rotary(head_dim, T, theta)
    got = apply_rotary(x, *rotary.at(0, T))
    expected = complex_rotation(x, torch.arange(T), theta)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    # A window starting at position 10 turns by positions 10..10+T'-1, not 0..T'-1.
    later = apply_rotary(x[:, :, :7], *rotary.at(10, 7))
    torch.testing.assert_close(later.double(), complex_rotation(x[:, :, :7], torch.arange(10, 17), theta),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(later, got[:, :, :7])  # (position 0 is the identity; 10 is not)


def test_rotary_preserves_every_vectors_norm():
    T, d = 32, 16
    x = torch.randn(2, 4, T, d, generator=torch.Generator().manual_seed(2)) * 3
    rotated = apply_rotary(x, *Rotary(d, T, 10000.0).at(0, T))
    # Per batch row, head and position: a rotation of each pair keeps the whole vector's length.
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotated[:, :, 1:], x[:, :, 1:], atol=1e-3)  # ...while moving it


def rotate_one(v: torch.Tensor, rotary: Rotary, position: int) -> torch.Tensor:
    return apply_rotary(v.view(1, 1, 1, -1), *rotary.at(position, 1)).view(-1)


def test_rotary_scores_depend_only_on_the_distance():
    d, block = 16, 64
    generator = torch.Generator().manual_seed(3)
    q, k = torch.randn(d, generator=generator), torch.randn(d, generator=generator)
    rotary = Rotary(d, block, 10000.0)
    for m, n in [(5, 2), (2, 5), (7, 7), (20, 0)]:
        reference = rotate_one(q, rotary, m) @ rotate_one(k, rotary, n)
        for shift in (1, 3, 10, 30):
            shifted = rotate_one(q, rotary, m + shift) @ rotate_one(k, rotary, n + shift)
            torch.testing.assert_close(shifted, reference, atol=1e-4, rtol=1e-4)
    # ...and they do depend on the distance: otherwise the test above would hold for no rotation at all.
    scores = [float(rotate_one(q, rotary, 10) @ rotate_one(k, rotary, n)) for n in range(10)]
    assert max(scores) - min(scores) > 0.1


def test_rotary_score_matrix_is_the_same_wherever_the_window_starts():
    d, T, block = 16, 12, 64
    generator = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, T, d, generator=generator), torch.randn(1, 2, T, d, generator=generator)
    rotary = Rotary(d, block, 10000.0)

    def scores(start: int) -> torch.Tensor:  # every query against every key, both windows at `start`
        cos_sin = rotary.at(start, T)
        return apply_rotary(q, *cos_sin) @ apply_rotary(k, *cos_sin).transpose(-1, -2)

    for start in (1, 9, block - T):
        torch.testing.assert_close(scores(start), scores(0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2), atol=1e-2)


# ------------------------------------------------------------------------------------ norms


def test_rmsnorm_is_x_over_its_root_mean_square_times_the_gain_without_bias():
    norm = make_norm(config(norm="rmsnorm"), 32)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # no bias, even with bias=True
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2.0, 3.0, 32))
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(5)) * 4 + 7  # off-centre: not LayerNorm
    expected = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    # No centring: LayerNorm with the same gain gives something else on an off-centre input.
    layer = make_norm(config(norm="layernorm", bias=False), 32)
    with torch.no_grad():
        layer.weight.copy_(norm.weight)
    assert not torch.allclose(layer(x), norm(x), atol=1e-2)
    assert isinstance(make_norm(config(), 32), torch.nn.LayerNorm) and make_norm(config(), 32).bias is not None


def test_qk_norm_rms_normalises_each_heads_queries_and_keys_before_the_rotation():
    model = variant_model(positions="rope", qk_norm=True, n_kv_head=2)
    attn, c = model.blocks[0].attn, model.config
    B, T, hd = 2, 9, c.head_dim
    x = torch.randn(B, T, c.d_model, generator=torch.Generator().manual_seed(6))
    q, k, v = attn.queries_keys_values(x, model.rotary_at(0, T))
    assert q.shape == (B, c.n_head, T, hd) and k.shape == v.shape == (B, c.kv_heads, T, hd)

    def rms(t: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return t / torch.sqrt(t.pow(2).mean(dim=-1, keepdim=True) + 1e-5) * gain

    raw = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q_raw = raw[..., :c.d_model].view(B, T, c.n_head, hd).transpose(1, 2)
    k_raw = raw[..., c.d_model:c.d_model + c.kv_heads * hd].view(B, T, c.kv_heads, hd).transpose(1, 2)
    v_raw = raw[..., c.d_model + c.kv_heads * hd:].view(B, T, c.kv_heads, hd).transpose(1, 2)
    positions = torch.arange(T)
    expected_q = complex_rotation(rms(q_raw, attn.q_norm.weight), positions, c.rope_theta)
    expected_k = complex_rotation(rms(k_raw, attn.k_norm.weight), positions, c.rope_theta)
    torch.testing.assert_close(q.double(), expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.double(), expected_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, v_raw)  # values are neither normed nor rotated


# ------------------------------------------------------------------------ grouped-query attention


def repeated_kv_heads(gqa: GPT) -> GPT:
    """A multi-head model (n_kv_head 0) computing what `gqa` should: its q/k/v matrix keeps the
    query rows and gives query head h the rows of key/value head h // (n_head / n_kv_head)."""
    c = gqa.config
    mha = GPT(dataclasses.replace(c, n_kv_head=0)).eval()
    group, hd = c.n_head // c.kv_heads, c.head_dim
    state = dict(gqa.state_dict())
    for key in [k for k in state if k.endswith("attn.qkv.weight") or k.endswith("attn.qkv.bias")]:
        t = state[key]
        q, k, v = t.split([c.d_model, c.kv_heads * hd, c.kv_heads * hd], dim=0)
        k, v = (u.reshape(c.kv_heads, hd, *u.shape[1:]).repeat_interleave(group, dim=0).reshape(c.d_model, *u.shape[1:])
                for u in (k, v))
        state[key] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    return mha


@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads(n_kv_head, positions):
    gqa = variant_model(n_kv_head=n_kv_head, positions=positions)
    assert gqa.blocks[0].attn.qkv.weight.shape == (BASE.d_model + 2 * n_kv_head * BASE.head_dim, BASE.d_model)
    mha = repeated_kv_heads(gqa)
    idx = tokens(3, 20)
    with torch.no_grad():
        expected = mha(idx).logits
        torch.testing.assert_close(gqa(idx).logits, expected, atol=1e-5, rtol=1e-5)
        # The cache holds only the shared heads (GQA's saving), and decoding with it agrees too.
        cache = gqa.new_kv_cache(3)
        first = gqa(idx[:, :12], kv_cache=cache).logits
        assert all(k.shape == (3, n_kv_head, BASE.block_size, BASE.head_dim) for k in cache.keys + cache.values)
        rest = torch.cat([gqa(idx[:, t:t + 1], kv_cache=cache).logits for t in range(12, 20)], dim=1)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), expected, atol=1e-5, rtol=1e-5)


def test_the_gqa_reference_can_tell_a_wrong_head_mapping():
    """The test above has power: pairing query head h with kv head h % n_kv_head (tiling instead of
    repeat_interleave) changes the logits of these peaked weights well beyond its tolerance."""
    gqa = variant_model(n_kv_head=2)
    mha = repeated_kv_heads(gqa)
    c = gqa.config
    with torch.no_grad():
        for block in mha.blocks:
            w = block.attn.qkv.weight
            k = w[c.d_model:2 * c.d_model].view(c.n_head, c.head_dim, -1)
            k.copy_(k[[0, 2, 1, 3]].clone())  # heads (0, 0, 1, 1) become (0, 1, 0, 1)
        idx = tokens(2, 16)
        assert (gqa(idx).logits - mha(idx).logits).abs().max() > 1e-2


# ------------------------------------------------------------------------------------ soft cap


def test_soft_capped_logits_stay_within_the_cap_and_equal_tanh_of_the_uncapped_ones():
    cap = 5.0
    capped = variant_model(logit_softcap=cap, tie_embeddings=False)
    with torch.no_grad():
        capped.lm_head.weight.mul_(50.0)
    uncapped = GPT(dataclasses.replace(capped.config, logit_softcap=0.0)).eval()
    uncapped.load_state_dict(capped.state_dict())
    idx = tokens(2, 24)
    with torch.no_grad():
        raw, logits = uncapped(idx).logits, capped(idx).logits
    assert raw.abs().max() > 20 * cap  # the uncapped logits go far past the cap...
    # ...the capped ones never do. (float32 tanh rounds to exactly 1 beyond ~9 * cap, so the open
    # interval (-cap, cap) of exact arithmetic is the closed one here.)
    assert logits.abs().max() <= cap
    moderate = raw.abs() < 3 * cap  # where float32 can still tell tanh from 1: strictly inside
    assert moderate.sum() > 10 and (logits[moderate].abs() < cap).all()
    torch.testing.assert_close(logits, cap * torch.tanh(raw.double() / cap).float(), atol=1e-5, rtol=1e-5)
    # The loss is on the capped logits.
    targets = tokens(2, 24, seed=1)
    torch.testing.assert_close(capped(idx, targets).loss, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)))


# ------------------------------------------------------------------------------------ MLPs


@pytest.mark.parametrize("d_model", [384, 512, 768])
def test_swiglu_default_width_costs_what_the_4x_gelu_mlp_costs(d_model):
    def mlp_params(mlp: str) -> int:
        c = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=4, d_model=d_model, bias=False, mlp=mlp)
        with torch.device("meta"):
            return sum(p.numel() for p in MLP(c).parameters())

    gelu, swiglu = mlp_params("gelu"), mlp_params("swiglu")
    assert gelu == 8 * d_model**2
    assert swiglu == pytest.approx(gelu, rel=0.01)
    width = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=4, d_model=d_model, mlp="swiglu").mlp_width
    assert width % 8 == 0 and swiglu == 3 * width * d_model


def test_relu2_and_swiglu_mlps_compute_their_formulas():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    relu2 = variant_model(mlp="relu2").blocks[0].mlp
    fc, proj = relu2.fc, relu2.proj
    expected = F.linear(torch.clamp(F.linear(x, fc.weight, fc.bias), min=0) ** 2, proj.weight, proj.bias)
    torch.testing.assert_close(relu2(x), expected, atol=1e-5, rtol=1e-5)
    assert relu2.gate is None and fc.weight.shape == (4 * 32, 32)

    swiglu = variant_model(mlp="swiglu").blocks[0].mlp
    gate_in = F.linear(x, swiglu.gate.weight, swiglu.gate.bias)
    hidden = gate_in * torch.sigmoid(gate_in) * F.linear(x, swiglu.fc.weight, swiglu.fc.bias)
    torch.testing.assert_close(swiglu(x), F.linear(hidden, swiglu.proj.weight, swiglu.proj.bias),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ every variant: cache, save/load


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_kv_cache_equals_the_full_forward_for_every_variant(overrides):
    model = variant_model(**overrides)
    idx = tokens(3, 26)
    with torch.no_grad():
        full = model(idx, return_hidden=True)
        cache = model.new_kv_cache(batch_size=3)
        assert cache.keys[0].shape[1] == model.config.kv_heads
        start = 0
        for size in [5, 1, 1, 7, 3, 1, 8]:  # prefills after a cached prefix, and single tokens
            out = model(idx[:, start:start + size], kv_cache=cache, return_hidden=True)
            end = start + size
            torch.testing.assert_close(out.logits, full.logits[:, start:end], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.hidden, full.hidden[:, start:end], atol=1e-5, rtol=1e-4)
            start = end
        assert cache.length == start == 26


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_save_and_load_round_trips_every_variant(tmp_path, overrides):
    model = variant_model(**overrides)
    save_model(model, tmp_path / "model.pt", extra={})
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.config == model.config
    idx = tokens(2, 17)
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, model(idx).logits)
    tied = loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()
    assert tied == model.config.tie_embeddings


def test_an_old_gpt2_checkpoint_still_loads_bit_for_bit():
    """model.pt files written before the architecture axes existed hold no positions/norm/... keys:
    they must load as the GPT-2 they were, and give exactly the logits they gave then."""
    fixtures = Path(__file__).parent / "fixtures"
    payload = torch.load(fixtures / "gpt2_before_recipes.pt", weights_only=True)
    assert "positions" not in payload["config"]  # really an old file
    model = load_model(fixtures / "gpt2_before_recipes.pt")
    reference = torch.load(fixtures / "gpt2_before_recipes_logits.pt", weights_only=True)
    with torch.no_grad():
        # The reference logits were computed on another CPU (Zen 4): matmul kernels of another instruction
        # set round differently in the last bit. A wrong architecture would be off by ~0.1, not 1e-7.
        torch.testing.assert_close(model(reference["idx"]).logits, reference["logits"], rtol=0, atol=1e-6)
    c = model.config
    assert (c.positions, c.norm, c.mlp, c.qk_norm, c.tie_embeddings, c.kv_heads, c.logit_softcap) == (
        "learned", "layernorm", "gelu", False, True, c.n_head, 0.0)
    assert c.mlp_width == 4 * c.d_model and model.rotary is None and model.wpe is not None
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


# ------------------------------------------------------------- training and decoding a modern variant


def test_activation_checkpointing_gives_the_same_gradients_for_a_modern_variant():
    idx, targets = tokens(2, 16), tokens(2, 16, seed=1)
    grads = []
    for enabled in (False, True):
        model = variant_model(**MODERN).train()
        model.activation_checkpointing = enabled
        model(idx, targets).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    assert grads[0]["blocks.0.attn.q_norm.weight"].abs().sum() > 0  # the rotation's inputs get gradients


PROMPT = [3, 1, 4, 1, 5]


def test_greedy_with_the_cache_equals_argmax_over_full_forwards_on_a_modern_variant():
    model = variant_model(**MODERN)
    steps = model.config.block_size - len(PROMPT)  # within one window: no sliding
    sequence = list(PROMPT)
    with torch.no_grad():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    assert generate(model, PROMPT, Greedy(), steps, None)[0].tokens == sequence[len(PROMPT):]
    assert len(set(sequence[len(PROMPT):])) > 3  # not a constant run that any bug would reproduce


STRATEGIES = [Greedy(), Sample(temperature=0.9, top_k=20), Beam(width=3), Contrastive(top_k=4, alpha=0.6)]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: type(s).__name__)
def test_every_decoding_strategy_runs_on_a_modern_variant_with_and_without_the_cache(strategy):
    model = variant_model(**MODERN)
    # 2 * block_size new tokens: the window slides, and rotary positions restart with each rebuild.
    n = 2 * model.config.block_size
    cached = decode(model, PROMPT, strategy, n, None, seeds=[0, 1])
    recomputed = decode(model, PROMPT, strategy, n, None, seeds=[0, 1], use_cache=False)
    assert [g.tokens for g in cached] == [g.tokens for g in recomputed]
    assert all(len(g.tokens) == n and all(0 <= t < VOCAB for t in g.tokens) for g in cached)
    for a, b in zip(cached, recomputed):
        assert all(math.isfinite(x) and x <= 0 for x in a.logprobs)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)
