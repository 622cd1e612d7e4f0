"""Our GPT as a Hugging Face transformers model: `AutoModelForCausalLM.from_pretrained(dir)`, no custom code.

Each combination of GPTConfig axes maps onto the transformers architecture that computes exactly it:

  positions  norm       mlp           qk_norm  n_kv_head  bias   ->  architecture
  learned    layernorm  gelu | relu2  no       0 (MHA)    any        GPT-2 (`gpt2`)
  rope       layernorm  gelu | relu2  no       0 (MHA)    any        GPT-NeoX (`gpt_neox`: sequential residual)
  rope       rmsnorm    swiglu        no       any        any        Llama (`llama`)
  rope       rmsnorm    swiglu        yes      any        false      Qwen3 (`qwen3`)
  rope       rmsnorm    gelu | relu2  no       any        any        Arcee (`arcee`)
  rope       rmsnorm    gelu | relu2  yes      any        false      Apertus (`apertus`)

tie_embeddings and mlp_hidden map everywhere; logit_softcap > 0 nowhere. All six are pre-norm decoders
with our eps (1e-5, the QK-norm's too) and attention scaled by 1/sqrt(head_dim); the rotary ones turn
pair (i, i + d/2) (rotate-half, as `tinylm.model.apply_rotary`) over the whole head, apply the per-head
QK RMSNorm before the rotation, and let query head h read key/value head h // (n_head / n_kv_head).
Our GELU is F.gelu's exact erf form: transformers' "gelu" (GPT-2's own default is the tanh "gelu_new").
Where a layer has biases whatever the config (GPT-2's, NeoX's MLP, LayerNorm), bias=false exports zeros.
Every other combination raises NotExportable, naming the option.

The export is checked before it replaces the output directory: transformers loads it from the
staging directory and must give our ids on a probe text and our logits on a full block of it.
"""
from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from tinylm.errors import PipelineError
from tinylm.export.hf_tokenizer import write_hf_tokenizer
from tinylm.files import replace_directory, write_bytes, write_text
from tinylm.model import GPT, NORM_EPS, CausalSelfAttention, GPTConfig
from tinylm.tokenizer.bpe import EOT, Tokenizer

SKIPPED = "EXPORT_SKIPPED.txt"  # what the output directory holds instead when NotExportable
# Rotary + RMSNorm decoders, by (gated MLP, qk_norm): Llama's block, with QK-norm (Qwen3), with a
# non-gated MLP (Arcee), or both (Apertus).
ROTARY_RMSNORM = {(True, False): "llama", (True, True): "qwen3", (False, False): "arcee", (False, True): "apertus"}
NO_MLP_BIAS = {"qwen3", "apertus"}  # their MLPs are built with bias=False whatever the config says
HIDDEN_ACT = {"gelu": "gelu", "relu2": "relu2", "swiglu": "silu"}  # swiglu: silu(gate) * up
# fp32 on CPU the implementations differ by rounding only: GPT-2 gives our logits bit for bit, the
# rotary ones within ~2e-6 (they compute the rotation angles in fp32, we in fp64).
LOGITS_ATOL = 1e-4
PROBE = f"Once upon a time, there was a little dog named Max. He liked to run and play in the park.{EOT}"


class NotExportable(PipelineError):
    """The model has an option that no transformers architecture computes without custom code."""


def _value(value: object) -> str:
    """A param as params.yaml spells it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def architecture(config: GPTConfig) -> str:
    """The transformers model_type that computes exactly what `config` does; NotExportable if none does."""
    if config.logit_softcap > 0:
        raise NotExportable(f"model.logit_softcap={config.logit_softcap}: no transformers architecture without "
                            "custom code soft-caps the final logits (cap * tanh(logits / cap)) of a plain pre-norm "
                            "decoder (Gemma 2's cap comes with sandwich norms and scaled embeddings); the "
                            "transformers export is skipped")
    gated, grouped = config.mlp == "swiglu", config.kv_heads != config.n_head
    if config.positions == "learned":
        model_type, family = "gpt2", "GPT-2, the transformers architecture with learned positions,"
        refusals = [(config.norm != "layernorm", "norm", "normalises with LayerNorm only"),
                    (gated, "mlp", "has no gated MLP"), (config.qk_norm, "qk_norm", "has no QK-norm"),
                    (grouped, "n_kv_head", "has no grouped-query attention (set 0: a key/value head per query head)")]
    elif config.norm == "layernorm":
        model_type, family = "gpt_neox", "GPT-NeoX, the transformers architecture with rotary positions and LayerNorm,"
        refusals = [(gated, "mlp", "has no gated MLP (with model.norm=rmsnorm it exports as Llama)"),
                    (config.qk_norm, "qk_norm", "has no QK-norm (with model.norm=rmsnorm it exports)"),
                    (grouped, "n_kv_head", "has no grouped-query attention (with model.norm=rmsnorm it exports)")]
    else:
        model_type = ROTARY_RMSNORM[gated, config.qk_norm]
        family = (f"{model_type.capitalize()}, the transformers architecture with rotary positions, RMSNorm, "
                  f"a {config.mlp} MLP{' and QK-norm' if config.qk_norm else ''},")
        refusals = [(config.bias and model_type in NO_MLP_BIAS, "bias", "has no MLP biases (set model.bias=false)")]
    for refused, option, why in refusals:
        if refused:
            raise NotExportable(f"model.{option}={_value(getattr(config, option))}: {family} {why}; the "
                                f"transformers export is skipped")
    return model_type


def hf_config(config: GPTConfig, model_type: str, eot_id: int, dtype: torch.dtype) -> PreTrainedConfig:
    """The transformers config of `model_type` with our sizes, eps, rotary base and biases.

    dropout acts in training only: it goes to each dropout the architecture has where ours is (GPT-2 has
    all of ours, the Llama family only the attention's), and inference is the same everywhere.
    """
    common = dict(architectures=[MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]], vocab_size=config.vocab_size,
                  tie_word_embeddings=config.tie_embeddings, bos_token_id=eot_id, eos_token_id=eot_id,
                  pad_token_id=None, dtype=str(dtype).removeprefix("torch."))
    if model_type == "gpt2":
        return AutoConfig.for_model(
            model_type, n_positions=config.block_size, n_embd=config.d_model, n_layer=config.n_layer,
            n_head=config.n_head, n_inner=config.mlp_width, activation_function=HIDDEN_ACT[config.mlp],
            resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
            layer_norm_epsilon=NORM_EPS, **common)
    # "default": plain rotary, not the llama3 / partial (0.25) rotary some of these configs default to.
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    common |= dict(hidden_size=config.d_model, intermediate_size=config.mlp_width, num_hidden_layers=config.n_layer,
                   num_attention_heads=config.n_head, max_position_embeddings=config.block_size,
                   hidden_act=HIDDEN_ACT[config.mlp], attention_bias=config.bias, attention_dropout=config.dropout)
    if model_type == "gpt_neox":
        return AutoConfig.for_model(model_type, rope_parameters=rope | {"partial_rotary_factor": 1.0},
                                    layer_norm_eps=NORM_EPS, use_parallel_residual=False,
                                    hidden_dropout=config.dropout, **common)
    if model_type not in NO_MLP_BIAS:
        common["mlp_bias"] = config.bias
    return AutoConfig.for_model(model_type, rope_parameters=rope, num_key_value_heads=config.kv_heads,
                                head_dim=config.head_dim, rms_norm_eps=NORM_EPS, **common)


def _linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None,
            zero_bias: bool = False) -> dict[str, torch.Tensor]:
    """name.weight and name.bias; with bias=false a layer that always has one gets zeros (exactly ours)."""
    if bias is None and zero_bias:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return {f"{name}.weight": weight} | ({f"{name}.bias": bias} if bias is not None else {})


def _module(name: str, module: torch.nn.Module, zero_bias: bool = False) -> dict[str, torch.Tensor]:
    return _linear(name, module.weight, getattr(module, "bias", None), zero_bias)  # RMSNorm has no bias


def _split_qkv(attn: CausalSelfAttention) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of q, k and v: our fused qkv rows are [all query heads | key heads | value heads]."""
    weights = attn.qkv.weight.split(attn.split_sizes)
    biases = attn.qkv.bias.split(attn.split_sizes) if attn.qkv.bias is not None else (None,) * 3
    return list(zip(weights, biases))


def _gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    # GPT-2's Conv1D stores weights as [in, out]: ours transposed. All its layers have biases.
    def conv1d(name: str, linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
        return _module(name, linear, zero_bias=True) | {f"{name}.weight": linear.weight.t()}

    tensors = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
               **_module("transformer.ln_f", model.ln_f, zero_bias=True)}
    for i, block in enumerate(model.blocks):
        layer = f"transformer.h.{i}"
        tensors |= (_module(f"{layer}.ln_1", block.ln_1, zero_bias=True)
                    | conv1d(f"{layer}.attn.c_attn", block.attn.qkv) | conv1d(f"{layer}.attn.c_proj", block.attn.proj)
                    | _module(f"{layer}.ln_2", block.ln_2, zero_bias=True)
                    | conv1d(f"{layer}.mlp.c_fc", block.mlp.fc) | conv1d(f"{layer}.mlp.c_proj", block.mlp.proj))
    return tensors


def _gpt_neox_tensors(model: GPT) -> dict[str, torch.Tensor]:
    c = model.config

    def per_head(t: torch.Tensor) -> torch.Tensor:
        # NeoX's fused qkv rows are per head, [q, k, v] of head 0, then of head 1, ...: regroup ours.
        return t.view(3, c.n_head, c.head_dim, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    tensors = {"gpt_neox.embed_in.weight": model.wte.weight,
               **_module("gpt_neox.final_layer_norm", model.ln_f, zero_bias=True)}
    for i, block in enumerate(model.blocks):
        layer = f"gpt_neox.layers.{i}"
        qkv = block.attn.qkv
        tensors |= (_module(f"{layer}.input_layernorm", block.ln_1, zero_bias=True)
                    | _linear(f"{layer}.attention.query_key_value", per_head(qkv.weight),
                              None if qkv.bias is None else per_head(qkv.bias))
                    | _module(f"{layer}.attention.dense", block.attn.proj)
                    | _module(f"{layer}.post_attention_layernorm", block.ln_2, zero_bias=True)
                    | _module(f"{layer}.mlp.dense_h_to_4h", block.mlp.fc, zero_bias=True)
                    | _module(f"{layer}.mlp.dense_4h_to_h", block.mlp.proj, zero_bias=True))
    return tensors


def _rotary_rmsnorm_tensors(model: GPT, model_type: str) -> dict[str, torch.Tensor]:
    attn_norm, mlp_norm = (("attention_layernorm", "feedforward_layernorm") if model_type == "apertus"
                           else ("input_layernorm", "post_attention_layernorm"))
    tensors = {"model.embed_tokens.weight": model.wte.weight, "model.norm.weight": model.ln_f.weight}
    for i, block in enumerate(model.blocks):
        layer, attn, mlp = f"model.layers.{i}", block.attn, block.mlp
        tensors |= _module(f"{layer}.{attn_norm}", block.ln_1) | _module(f"{layer}.{mlp_norm}", block.ln_2)
        for name, (weight, bias) in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(attn)):
            tensors |= _linear(f"{layer}.self_attn.{name}", weight, bias)
        tensors |= _module(f"{layer}.self_attn.o_proj", attn.proj)
        if attn.q_norm is not None:
            tensors |= (_module(f"{layer}.self_attn.q_norm", attn.q_norm)
                        | _module(f"{layer}.self_attn.k_norm", attn.k_norm))
        # SwiGLU: silu(x W_gate) * x W_fc is transformers' act(gate_proj(x)) * up_proj(x).
        tensors |= _module(f"{layer}.mlp.up_proj", mlp.fc) | _module(f"{layer}.mlp.down_proj", mlp.proj)
        if mlp.gate is not None:
            tensors |= _module(f"{layer}.mlp.gate_proj", mlp.gate)
    return tensors


def hf_state_dict(model: GPT, model_type: str) -> dict[str, torch.Tensor]:
    """Our weights under `model_type`'s names, each its own contiguous CPU tensor (as safetensors needs)."""
    if model_type == "gpt2":
        tensors = _gpt2_tensors(model)
    elif model_type == "gpt_neox":
        tensors = _gpt_neox_tensors(model)
    else:
        tensors = _rotary_rmsnorm_tensors(model, model_type)
    if not model.config.tie_embeddings:  # tied, transformers ties lm_head to the embedding on load
        tensors["lm_head.weight"] = model.lm_head.weight
    return {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format) for name, t in tensors.items()}


def verify_export(model: GPT, tokenizer: Tokenizer, directory: Path) -> None:
    """transformers, loading `directory`, must give our ids for PROBE and our logits (eval mode) on a block of it."""
    fix = ("the installed transformers/tokenizers compute differently from what tinylm/export/ maps onto them: "
           "install the versions requirements.txt allows, or fix the mapping")
    ids = tokenizer.encode(PROBE)
    hf_ids = AutoTokenizer.from_pretrained(directory)(PROBE)["input_ids"]
    if hf_ids != ids:
        raise PipelineError(f"{directory / 'tokenizer.json'}: encodes {PROBE!r} as {hf_ids}, ours as {ids}; {fix}")
    hf_model, loading = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    problems = {kind: items for kind, items in loading.items() if items}
    if problems:
        raise PipelineError(f"{directory / 'model.safetensors'}: does not fit {type(hf_model).__name__}: "
                            f"{problems}; {fix}")
    block = torch.tensor([(ids * model.config.block_size)[:model.config.block_size]])  # every position
    training = model.training
    model.eval()  # no dropout, as in the model transformers loaded
    try:
        with torch.no_grad():
            diff = (hf_model(block).logits.float() - model(block).logits).abs().max().item()
    finally:
        model.train(training)
    if diff > LOGITS_ATOL:
        raise PipelineError(f"{directory}: {type(hf_model).__name__}'s logits differ from ours by {diff:.2e} "
                            f"(more than {LOGITS_ATOL}); {fix}")


def export_hf(model: GPT, tokenizer: Tokenizer, directory: str | os.PathLike) -> str:
    """Write `directory` as a transformers model + fast tokenizer; return its model_type.

    Same model and tokenizer, same bytes (safetensors and sorted JSON), so DVC sees a rerun changed nothing.
    Raises NotExportable, before writing anything, when no architecture computes what the model does.
    """
    model_type = architecture(model.config)
    eot_id, dtype, block_size = tokenizer.eot_id, model.wte.weight.dtype, model.config.block_size

    def fill(staging: Path) -> None:
        write_text(staging / "config.json", hf_config(model.config, model_type, eot_id, dtype).to_json_string())
        # Greedy by default; generation stops at <|endoftext|>, which also pads batched generations.
        generation = GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)
        write_text(staging / "generation_config.json", generation.to_json_string())
        weights = safetensors.torch.save(hf_state_dict(model, model_type), metadata={"format": "pt"})
        write_bytes(staging / "model.safetensors", weights)
        write_hf_tokenizer(tokenizer, staging, block_size)
        verify_export(model, tokenizer, staging)

    replace_directory(Path(directory), fill)
    return model_type


def write_skipped(directory: str | os.PathLike, reason: NotExportable) -> None:
    """Replace `directory` by one holding only SKIPPED, which says why there is no transformers model."""
    replace_directory(Path(directory), lambda staging: write_text(staging / SKIPPED, f"{reason}\n"))
