"""Typed, validated params: `params.yaml` loaded into one frozen dataclass per stage section.

Every key is required and typed; an unknown key, a wrong type or an out-of-range value raises
`ParamError` naming the dotted key (`train.lr`) and the file. PyYAML (YAML 1.1) reads `6e-4` as a
string, so floats are also accepted as numeric strings. Stages read only their own sections, and
`dvc.yaml` declares exactly those keys, so changing `train.lr` reruns pretrain and what follows.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tinylm.errors import PipelineError, run_stage


class ParamError(PipelineError, ValueError):
    """A param in params.yaml is missing, unknown, mistyped or out of range."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ParamError(f"{key}: {message}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        _fail(key, message)


def _at_least(section: Any, key: str, **minimums: float) -> None:
    """Each named field of the section must be >= its minimum (the most common range rule)."""
    for name, minimum in minimums.items():
        _require(getattr(section, name) >= minimum, f"{key}.{name}", f"must be >= {minimum:g}")


# torchrun's rendezvous endpoint: a host name or IPv4 address, or an IPv6 address in brackets, then the port.
_ENDPOINT = re.compile(r"(?P<host>[\w.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")


# ---------------------------------------------------------------------------------------------
# Sections. Each `check()` holds the range rules that types alone cannot say.


@dataclass(frozen=True)
class SplitFiles:
    """A local source given as one file per split (plain text or JSONL)."""

    train: str
    validation: str

    def check(self, key: str) -> None:
        for name in ("train", "validation"):
            _require(bool(getattr(self, name)), f"{key}.{name}", "must be a file path")


@dataclass(frozen=True)
class DataParams:
    """download: where the stories come from, and how many."""

    # Ordered: the first usable source wins (the hub when reachable, else the offline copy).
    sources: list[str | SplitFiles]
    max_train_stories: int
    max_val_stories: int
    hub_timeout_s: float
    # Blank-line separated text (no <|endoftext|> lines): a paragraph matching this regex opens a story.
    story_start_regex: str

    def check(self, key: str) -> None:
        _require(len(self.sources) > 0, f"{key}.sources", "list at least one source")
        _at_least(self, key, max_train_stories=1, max_val_stories=1)
        _require(0 < self.hub_timeout_s <= 30, f"{key}.hub_timeout_s", "must be in (0, 30] seconds")
        for i, source in enumerate(self.sources):
            if isinstance(source, SplitFiles):
                source.check(f"{key}.sources[{i}]")
            else:
                _require(bool(source.strip()), f"{key}.sources[{i}]", "must not be empty")
        try:
            re.compile(self.story_start_regex)
        except re.error as exc:
            _fail(f"{key}.story_start_regex", f"not a valid regular expression: {exc}")


@dataclass(frozen=True)
class CleanParams:
    """clean: which stories are kept, and how their text is normalised."""

    min_chars: int
    max_chars: int
    ascii_punctuation: bool
    max_nontext_fraction: float
    workers: int  # processes cleaning stories; the output is the same for any count

    def check(self, key: str) -> None:
        _at_least(self, key, min_chars=1, workers=1)
        _require(self.max_chars > self.min_chars, f"{key}.max_chars", "must be > clean.min_chars")
        _require(0 < self.max_nontext_fraction <= 1, f"{key}.max_nontext_fraction", "must be in (0, 1]")


@dataclass(frozen=True)
class TokenizerParams:
    """train_bpe (and clean, for the special tokens): the tokenizer and the ones it is compared with."""

    vocab_size: int
    special_tokens: list[str]
    compare_vocab_sizes: list[int]
    # The comparisons of reports/tokenizer.json train on at most this many bytes of train stories
    # (spread over the split); our tokenizer trains on all of them.
    compare_max_bytes: int
    workers: int

    def check(self, key: str) -> None:
        _require(len(self.special_tokens) >= 1, f"{key}.special_tokens", "must list <|endoftext|>")
        _require("<|endoftext|>" in self.special_tokens, f"{key}.special_tokens", "must include <|endoftext|>")
        for i, token in enumerate(self.special_tokens):
            _require(token != "", f"{key}.special_tokens[{i}]", "a special token cannot be empty")
        minimum = 256 + len(self.special_tokens)
        _require(self.vocab_size >= minimum, f"{key}.vocab_size", f"must be >= {minimum} (256 bytes + special tokens)")
        # Shards store token ids as uint16.
        _require(self.vocab_size <= 65535, f"{key}.vocab_size", "must be <= 65535 (shards store uint16 ids)")
        for i, size in enumerate(self.compare_vocab_sizes):
            # 256 means the bare byte-level baseline (no merges; special tokens come on top).
            _require(256 <= size <= 65535, f"{key}.compare_vocab_sizes[{i}]", "must be in [256, 65535]")
        _at_least(self, key, compare_max_bytes=1, workers=1)


@dataclass(frozen=True)
class ShardParams:
    """encode_shards: how the token stream is cut into files."""

    shard_tokens: int
    workers: int

    def check(self, key: str) -> None:
        _require(self.shard_tokens >= 1024, f"{key}.shard_tokens",
                 "must be >= 1024 tokens (each shard starts with a 1,024-byte header)")
        _at_least(self, key, workers=1)


@dataclass(frozen=True)
class ModelParams:
    """pretrain: the model's shape and architecture (tinylm/model.py describes each axis)."""

    n_layer: int
    n_head: int
    d_model: int
    block_size: int
    dropout: float
    bias: bool
    positions: Literal["learned", "rope"]
    rope_theta: float
    norm: Literal["layernorm", "rmsnorm"]
    mlp: Literal["gelu", "swiglu", "relu2"]
    mlp_hidden: int  # 0: 4 x d_model (gelu, relu2), or SwiGLU's width at the same parameter count
    qk_norm: bool
    tie_embeddings: bool
    n_kv_head: int  # 0: n_head (multi-head attention); 1: multi-query attention
    logit_softcap: float  # 0: off

    def check(self, key: str) -> None:
        _at_least(self, key, n_layer=1, n_head=1, d_model=1)
        _require(self.d_model % self.n_head == 0, f"{key}.d_model",
                 f"must be divisible by model.n_head ({self.d_model} % {self.n_head} != 0)")
        _at_least(self, key, block_size=2)
        _require(0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1)")
        _require(self.positions != "rope" or (self.d_model // self.n_head) % 2 == 0, f"{key}.positions",
                 f"rope needs an even head size, but model.d_model / model.n_head = {self.d_model // self.n_head}")
        _require(self.rope_theta > 1, f"{key}.rope_theta", "must be > 1 (10000 is the usual base)")
        _at_least(self, key, mlp_hidden=0, n_kv_head=0, logit_softcap=0)
        _require(self.n_kv_head == 0 or self.n_head % self.n_kv_head == 0, f"{key}.n_kv_head",
                 f"must divide model.n_head ({self.n_head}), or be 0 for one key/value head per query head")


@dataclass(frozen=True)
class TrainParams:
    """pretrain: the optimisation, its precision and where it runs."""

    seed: int
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    compile: bool
    activation_checkpointing: bool
    micro_batch_size: int
    grad_accum_steps: int  # per rank: a step trains micro_batch_size x grad_accum_steps x world size sequences
    # The launch, templated into pretrain's torchrun command in dvc.yaml: world size = nnodes x nproc_per_node.
    nproc_per_node: int
    nnodes: int
    rdzv_endpoint: str  # HOST:PORT where the nodes meet (c10d); port 0 picks a free one (one node only)
    max_steps: int
    lr: float
    # The schedule's floor as a fraction of each peak: AdamW decays to min_lr_ratio x lr, Muon to
    # min_lr_ratio x muon_lr, whatever lr is (docs/params-and-recipes.md, "A lower learning rate").
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    # Muon (train.optimizer: muon) orthogonalises the updates of the blocks' 2-D weight matrices;
    # AdamW (lr, weight_decay, betas above) keeps the embeddings, the head, norm gains and biases.
    optimizer: Literal["adamw", "muon"]
    muon_lr: float
    muon_momentum: float
    muon_weight_decay: float
    grad_clip: float
    eval_interval: int
    eval_batches: int
    # Stories at milestones (docs/training.md): at step 0, every sample_interval steps (0: off) and at the
    # end, a greedy and a min-p continuation of at most sample_tokens tokens of each prompt.
    sample_interval: int
    sample_prompts: list[str]
    sample_tokens: int
    log_interval: int
    checkpoint_interval: int
    peak_flops: float

    def check(self, key: str) -> None:
        _at_least(self, key, micro_batch_size=1, grad_accum_steps=1, max_steps=1, eval_interval=1, eval_batches=1,
                  log_interval=1, checkpoint_interval=1)
        _require(self.lr > 0, f"{key}.lr", "must be > 0")
        _require(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be in [0, 1] (a fraction of the peak lr)")
        _require(0 <= self.warmup_steps < self.max_steps, f"{key}.warmup_steps", "must be in [0, train.max_steps)")
        _at_least(self, key, weight_decay=0)
        _require(0 <= self.beta1 < 1, f"{key}.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, f"{key}.beta2", "must be in [0, 1)")
        _require(self.muon_lr > 0, f"{key}.muon_lr", "must be > 0")
        _require(0 <= self.muon_momentum < 1, f"{key}.muon_momentum", "must be in [0, 1)")
        _at_least(self, key, muon_weight_decay=0)
        _require(self.grad_clip > 0, f"{key}.grad_clip", "must be > 0")
        _require(self.peak_flops > 0, f"{key}.peak_flops", "must be > 0 (FLOP/s of the device, for MFU)")
        _at_least(self, key, sample_interval=0, sample_tokens=1)
        _require(self.sample_interval == 0 or len(self.sample_prompts) >= 1, f"{key}.sample_prompts",
                 "list at least one prompt, or set train.sample_interval: 0 to sample no stories")
        self._check_launch(key)

    def _check_launch(self, key: str) -> None:
        # torchrun rejects these with a bare AssertionError or its own wording; say which param and the fix.
        _require(self.nproc_per_node >= 1, f"{key}.nproc_per_node", f"must be >= 1, got {self.nproc_per_node}. "
                 "Fix: 1 on CPU, or the node's GPU count for one process per GPU")
        _require(self.nnodes >= 1, f"{key}.nnodes", f"must be >= 1, got {self.nnodes}. Fix: 1 on one machine")
        match = _ENDPOINT.fullmatch(self.rdzv_endpoint)
        _require(match is not None and int(match["port"]) <= 65535, f"{key}.rdzv_endpoint",
                 f"must be HOST:PORT with a port in [0, 65535], got {self.rdzv_endpoint!r}. Fix: 127.0.0.1:0 "
                 "on one node (any free port), or the first node's address and an open port, e.g. node0:29500")
        _require(self.nnodes == 1 or int(match["port"]) != 0, f"{key}.rdzv_endpoint",
                 f"port 0 (any free port) works on one node only, but train.nnodes is {self.nnodes}: every node "
                 "must dial the same port. Fix: the first node's address and an open port, e.g. node0:29500")


@dataclass(frozen=True)
class EvalParams:
    """evaluate_ppl: the windows that score the validation tokens."""

    batch_size: int
    stride: int

    def check(self, key: str) -> None:
        _at_least(self, key, batch_size=1)
        _require(self.stride >= 1, f"{key}.stride", "must be >= 1 (and <= model.block_size)")


@dataclass(frozen=True)
class SampleParams:
    """sample_sweep: the prompts and every decoding strategy's knobs."""

    prompts: list[str]
    num_samples: int
    max_new_tokens: int
    seed: int
    temperatures: list[float]
    top_k: list[int]
    top_p: list[float]
    min_p: float
    beam_width: int
    length_penalty: float
    contrastive_k: int
    contrastive_alpha: float

    def check(self, key: str) -> None:
        _require(len(self.prompts) >= 1, f"{key}.prompts", "list at least one prompt")
        _at_least(self, key, num_samples=1, max_new_tokens=1)
        for i, t in enumerate(self.temperatures):
            _require(t > 0, f"{key}.temperatures[{i}]", "must be > 0 (use greedy for temperature 0)")
        for i, k in enumerate(self.top_k):
            _require(k >= 1, f"{key}.top_k[{i}]", "must be >= 1")
        for i, p in enumerate(self.top_p):
            _require(0 < p <= 1, f"{key}.top_p[{i}]", "must be in (0, 1]")
        _require(0 < self.min_p <= 1, f"{key}.min_p", "must be in (0, 1]")
        _at_least(self, key, beam_width=1, length_penalty=0, contrastive_k=1)
        _require(0 <= self.contrastive_alpha <= 1, f"{key}.contrastive_alpha", "must be in [0, 1]")


@dataclass(frozen=True)
class ReportParams:
    """report: how much of each sample it quotes, and how many tokens of the first validation story
    its attention maps show."""

    sample_chars: int
    attention_tokens: int

    def check(self, key: str) -> None:
        _at_least(self, key, sample_chars=20, attention_tokens=2)


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, one section per stage."""

    data: DataParams
    clean: CleanParams
    tokenizer: TokenizerParams
    shards: ShardParams
    model: ModelParams
    train: TrainParams
    eval: EvalParams
    sample: SampleParams
    report: ReportParams

    def check(self, key: str) -> None:
        _require(self.eval.stride <= self.model.block_size, "eval.stride", "must be <= model.block_size")


# ---------------------------------------------------------------------------------------------
# Generic conversion from YAML values to the annotated types.


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin is Literal:
        choices = typing.get_args(annotation)
        _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _convert(value, option, key)
            except ParamError as exc:
                errors.append(str(exc))
        _fail(key, f"matches none of the allowed forms: {'; '.join(errors)}")
    if origin is list:
        _require(isinstance(value, list), key, f"must be a list, got {type(value).__name__}")
        (item_type,) = typing.get_args(annotation)
        return [_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 6e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                _fail(key, f"must be a number, got {value!r}")
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        _require(math.isfinite(value), key, f"must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported param type {annotation!r} for {key}")


def _build(cls: type, raw: Any, key: str) -> Any:
    where = key or "params.yaml"
    _require(isinstance(raw, dict), where, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{key}." if key else ""
    for unknown in sorted(set(raw) - set(names)):
        _fail(f"{prefix}{unknown}", f"unknown key (known: {', '.join(names)})")
    values = {}
    for name in names:
        _require(name in raw, f"{prefix}{name}", "missing")
        values[name] = _convert(raw[name], hints[name], f"{prefix}{name}")
    instance = cls(**values)
    instance.check(key)
    return instance


def parse_params(raw: Any) -> Params:
    return _build(Params, raw, "")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate the whole params file; errors name the file and the dotted key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamError(f"{path}: not found (run the stage from the repository root)") from None
    except yaml.YAMLError as exc:
        raise ParamError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_params(raw)
    except ParamError as exc:
        raise ParamError(f"{path}: {exc}") from None


def to_dict(section: Any) -> dict[str, Any]:
    """A section as plain data (for fingerprints and reports)."""
    return dataclasses.asdict(section)



if __name__ == "__main__":
    # `python -m tinylm.config` validates params.yaml. pretrain's cmd runs it before torchrun, which would
    # reject a bad launch param (train.nproc_per_node: 0) with a bare AssertionError naming no key.
    run_stage(load_params)
