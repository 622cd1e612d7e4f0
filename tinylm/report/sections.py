"""reports/report.md: what the pipeline did, built from its outputs only (no recomputation of results).

Every number comes from a file an earlier stage wrote (see `tinylm.report.inputs`); the model's
insides (attention, weights) are read from data/model. Figures go to reports/figures/ and the
markdown links them relatively, so the report renders on GitHub; the markdown is written last,
after every figure it links, and each file is replaced atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from tinylm.config import Params
from tinylm.corpus.formats import iter_eot_stories
from tinylm.files import write_text
from tinylm.model import load_trained_model
from tinylm.report import figures, introspection
from tinylm.records.clean import CleanReport
from tinylm.records.download import Provenance
from tinylm.records.environment import Environment
from tinylm.records.shards import ShardsReport
from tinylm.records.evaluation import EvalReport
from tinylm.records.milestones import MilestoneSample
from tinylm.records.model import ModelSummary
from tinylm.records.sampling import GeneratedSample, SamplingReport
from tinylm.records.tokenizer import TokenizerReport
from tinylm.report.inputs import (CLEAN, CLEAN_VAL, EVAL, MODEL_DIR, MODEL_SUMMARY, PROVENANCE, SAMPLES, SAMPLING,
                                  SHARDS, TOKENIZER_DIR, TOKENIZER_REPORT, TRAIN_METRICS, TRAIN_SAMPLES, TRAIN_SERIES,
                                  MODEL_ENVIRONMENT, TrainMetrics, read_series, require)
from tinylm.report.markdown import (Report, code_block, count, duration, escape, number, shown_token, short,
                                    table)
from tinylm.tokenizer.bpe import Tokenizer, load_tokenizer

REPORT = Path("reports/report.md")
FIGURES = Path("reports/figures")
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal tokens per parameter


def data_section(report: Report, provenance: Provenance, clean: CleanReport, shards: ShardsReport) -> None:
    report.add("## Data", "",
               f"Source: `{provenance.source}` ({provenance.kind}). Stories per split through the pipeline: "
               "read by download, kept by clean (mojibake repaired in place), and tokens in the shards "
               "(each story followed by `<|endoftext|>`).", "")
    splits = {"train": (provenance.splits.train, clean.train, shards.train),
              "val": (provenance.splits.val, clean.val, shards.val)}
    report.add(*table(["split", "stories downloaded", "stories kept", "mojibake repaired", "tokens",
                       "text bytes per token"],
                      [[split, count(downloaded.stories), count(kept.stories_out), count(kept.mojibake_repaired),
                        count(encoded.tokens), number(encoded.bytes_per_token, 2)]
                       for split, (downloaded, kept, encoded) in splits.items()]))
    cleaned = (clean.train, clean.val)
    reasons = sorted(set(clean.train.dropped) | set(clean.val.dropped))
    rows = [[reason, *(count(split.dropped.get(reason, 0)) for split in cleaned)] for reason in reasons]
    rows.append(["**total dropped**", *(count(split.stories_in - split.stories_out) for split in cleaned)])
    report.add("Stories dropped by the clean stage, per reason:", "", *table(["reason", "train", "val"], rows))


def tokenizer_section(report: Report, stats: TokenizerReport, d_model: int) -> None:
    report.add("## Tokenizer", "",
               f"Our byte-level BPE: {count(stats.vocab_size)} tokens ({count(stats.num_merges)} merges), "
               f"trained in {number(stats.train_seconds, 1)} s. Compression on the validation text, in UTF-8 "
               "bytes per token (higher means shorter sequences: more story per context window, less compute "
               f"per story). The Hugging Face tokenizers are trained with the same vocab size on "
               f"{number(stats.compare_bytes / 1e6, 1)} MB of the train stories (all of them, when they fit in "
               f"tokenizer.compare_max_bytes = {number(stats.compare_max_bytes / 1e6, 1)} MB, else stories spread "
               "evenly over them); vocab overlap is the share of our multi-byte tokens they also learned.", "")
    rows = [("ours (BPE)", stats.vocab_size, stats.val_bytes_per_token, None)]
    for label, hf in (("HF BPE", stats.hf_bpe), ("HF Unigram", stats.hf_unigram),
                      ("HF Unigram (Metaspace)", stats.hf_unigram_metaspace)):
        rows.append((label, hf.vocab_size, hf.val_bytes_per_token, hf.vocab_overlap))
    if stats.gpt2 is not None:
        rows.append(("GPT-2 (tiktoken)", stats.gpt2.vocab_size, stats.gpt2.val_bytes_per_token, None))
    report.add(*table(["tokenizer", "vocab size", "bytes per token", "vocab overlap with ours"],
                      [[label, count(size), number(bpt, 3), "–" if overlap is None else f"{overlap:.1%}"]
                       for label, size, bpt, overlap in rows]))
    if stats.gpt2 is None:
        report.add("GPT-2 is missing: its files were not in `TIKTOKEN_CACHE_DIR` when train_bpe ran.", "")
    sizes = sorted(stats.vocab_sizes.values(), key=lambda entry: entry.vocab_size)
    bars = [(f"{label}, vocab {count(size)}", bpt, label.split(" ")[0]) for label, size, bpt, _ in rows]
    bars += [(f"ours (BPE), vocab {count(s.vocab_size)}", s.val_bytes_per_token, "ours")
             for s in sizes if s.vocab_size != stats.vocab_size]
    report.figure("tokenizer_bytes_per_token", figures.bytes_per_token_chart(bars),
                  "Bytes per token of each tokenizer and vocabulary size")

    report.add("Our BPE at other vocabulary sizes (256 is raw bytes, no merges). A bigger vocabulary shortens the "
               f"sequences but costs an embedding row per token: at this model's d_model = {d_model}, each "
               "token adds that many parameters (twice without weight tying).", "")
    report.add(*table(["vocab size", "validation tokens", "bytes per token", "embedding parameters"],
                      [[count(s.vocab_size), count(s.val_tokens), number(s.val_bytes_per_token, 3),
                        count(s.vocab_size * d_model)] for s in sizes]))

    examples = stats.examples
    has_gpt2 = all(tokens.gpt2 is not None for tokens in examples.values())
    report.add("How words reach the model:", "")
    report.add(*table(["text", "ours", *(["GPT-2"] if has_gpt2 else [])],
                      [[shown_token(word), " ".join(map(shown_token, tokens.ours)),
                        *([" ".join(map(shown_token, tokens.gpt2))] if has_gpt2 else [])]
                       for word, tokens in examples.items()], numeric_from=3))
    variants = [word for word in examples if word.strip() == "strawberry"]
    if variants:
        spelled = "; ".join(
            f"{shown_token(word)} is {len(pieces)} token{'s' if len(pieces) > 1 else ''} "
            f"({' '.join(map(shown_token, pieces))}, holding {' + '.join(str(p.count('r')) for p in pieces)} r's)"
            for word, pieces in ((word, examples[word].ours) for word in variants))
        report.add(f"**Why LLMs miscount letters.** `strawberry` has 3 r's, but a model never sees letters. In our "
                   f"tokenizer, {spelled}. Each token is one id, an opaque row of the embedding table: the letters it "
                   "spells are not in the input and can only be inferred from how the token is used. Counting "
                   "the r's asks the model to spell tokens it only ever saw as wholes, and the pieces change with "
                   "context (a leading space, a capital letter), so the same word hides its letters differently.",
                   "")


def architecture(config: dict) -> str:
    """One sentence naming the model's architecture axes (tinylm/model.py), from its saved config."""
    positions = "rotary positions" if config["positions"] == "rope" else "learned positions"
    mlp = {"gelu": "GELU MLP", "swiglu": "SwiGLU MLP", "relu2": "ReLU² MLP"}[config["mlp"]]
    norm = "RMSNorm" if config["norm"] == "rmsnorm" else "LayerNorm"
    parts = [f"pre-{norm} blocks", positions, mlp,
             "LM head tied to the token embedding" if config["tie_embeddings"] else "untied LM head"]
    if config["qk_norm"]:
        parts.append("QK-norm")
    if config["n_kv_head"] and config["n_kv_head"] != config["n_head"]:
        parts.append(f"grouped-query attention ({config['n_kv_head']} key/value heads for {config['n_head']} "
                     "query heads)")
    if config["logit_softcap"]:
        parts.append(f"logits soft-capped at ±{config['logit_softcap']:g}")
    return f"A decoder-only transformer: {', '.join(parts)}."


def model_section(report: Report, summary: ModelSummary, shards: ShardsReport, batch_tokens: int) -> None:
    config = summary.config
    params, params_no_emb, tokens = summary.params, summary.params_without_embeddings, summary.tokens_trained
    per_param = tokens / params
    optimal = CHINCHILLA_TOKENS_PER_PARAM * params
    report.add("## Model", "", architecture(config), "")
    report.add(*table(["setting", "value"], [[name, value] for name, value in config.items()]))
    report.add(*table(["quantity", "value"], [
        ["parameters (with embeddings; a tied head counted once)", count(params)],
        ["parameters without embeddings (token and position)", count(params_no_emb)],
        ["optimizer steps", count(summary.steps)],
        ["tokens per step", count(batch_tokens)],
        ["training tokens", count(tokens)],
        ["epochs over the train shards", number(tokens / shards.train.tokens, 2)],
        ["tokens per parameter", number(per_param, 2)],
        ["tokens per non-embedding parameter", number(tokens / params_no_emb, 2)],
    ]))
    verdict = ("fewer tokens than compute-optimal: a longer run (or a smaller model) would spend the same compute "
               "better" if per_param < CHINCHILLA_TOKENS_PER_PARAM else
               "more tokens than compute-optimal, which buys a better model per parameter (cheaper to run) "
               "at extra training compute")
    report.add(f"Chinchilla (Hoffmann et al., 2022) puts the compute-optimal budget near "
               f"{CHINCHILLA_TOKENS_PER_PARAM} tokens per parameter, {count(optimal)} tokens for this model. "
               f"This run trained on {number(per_param, 2)} tokens per parameter "
               f"({per_param / CHINCHILLA_TOKENS_PER_PARAM:.3g}× that ratio): {verdict}.", "")


def environment_note(report: Report, environment: Environment, source: str) -> None:
    """The library versions the model was trained with: another version can explain other numbers or bytes."""
    versions = ", ".join(f"{name} {version}" for name, version in environment.packages.items())
    report.add(f"Trained with Python {environment.python}, {versions} (`{source}`; `make setup` installs "
               "requirements.lock's versions).", "")


def training_section(report: Report, root: Path, metrics: TrainMetrics, summary: ModelSummary,
                     grad_clip: float, milestones: list[MilestoneSample], sample_chars: int) -> None:
    series = {name: read_series(root, name) for name in TRAIN_SERIES}
    batch_tokens = metrics.batch_tokens
    report.add("## Training", "",
               "Loss of each logged training batch (before its update) and of the fixed validation batches, "
               f"against optimizer steps and against training tokens ({count(batch_tokens)} per step). "
               "Source: the dvclive logs in `reports/train/`.", "")
    report.figure("loss", figures.loss_curves(*series["train_loss"], *series["val_loss"], batch_tokens),
                  "Train and validation loss against step and tokens")
    report.figure("training_dynamics", figures.training_dynamics(
        series["lr"], series["grad_norm"], series["tokens_per_s"], grad_clip),
        "Learning rate, gradient norm and throughput against step")
    report.add(*table(["quantity", "value"], [
        ["final train loss (last logged batch)", number(summary.final_train_loss, 4)],
        ["final validation loss", number(summary.final_val_loss, 4)],
        # Medians over the logged windows: the first ones include warm-up and compilation.
        ["median throughput (tokens/s)", count(round(float(np.median(series["tokens_per_s"][1]))))],
        ["median model FLOPs utilisation (of train.peak_flops)", f"{float(np.median(series['mfu'][1])):.1%}"],
        ["training time", duration(metrics.elapsed_s)],
    ]))
    milestones_table(report, milestones, dict(zip(*series["val_loss"])), sample_chars)


def milestones_table(report: Report, milestones: list[MilestoneSample], val_losses: dict[int, float],
                     sample_chars: int) -> None:
    """The greedy story of each prompt at every milestone, beside the validation loss of that step."""
    greedy = [row for row in milestones if row.strategy == "greedy"]
    report.add("### How the stories improved", "")
    if not greedy:
        report.add("No stories were sampled during training (`train.sample_interval` is 0).", "")
        return
    report.add("What the model wrote at each milestone of training (`train.sample_interval`; step 0 is the untrained "
               "model): the greedy continuation of each prompt (the prompt in bold), the text the model finds most "
               f"likely, trimmed to {sample_chars} characters after the prompt, beside the validation loss of that "
               "step. The min-p samples of the same milestones and each story's mean log-probability are in "
               "`reports/train/samples.jsonl` (a pretrain output in the DVC cache).", "")
    report.add(*table(["step", "val loss", "greedy continuation"],
                      [[count(row.step), number(val_losses[row.step], 4) if row.step in val_losses else "–",
                        sample_cell(row.prompt, row.text, sample_chars)] for row in greedy], numeric_from=3))


def evaluation_section(report: Report, ev: EvalReport) -> None:
    baselines = ev.baselines
    vocab = baselines.uniform.ppl
    uniform_bits = ev.tokens_evaluated * math.log2(vocab)
    rows = [["**trained model**", number(ev.val_loss, 4), number(ev.val_ppl, 2), number(ev.val_bpb, 4)]]
    for label, score in (("untrained model (same init)", baselines.untrained),
                         ("unigram (train token frequencies)", baselines.unigram)):
        rows.append([label, number(score.loss, 4), number(score.ppl, 2), number(score.bpb, 4)])
    rows.append(["uniform over the vocabulary", number(math.log(vocab), 4), number(vocab, 2),
                 number(uniform_bits / ev.bytes_evaluated, 4)])
    report.add("## Evaluation", "",
               f"Exact perplexity on the whole validation split: {count(ev.tokens_evaluated)} tokens "
               f"({count(ev.bytes_evaluated)} bytes), windows of {ev.block_size} tokens sliding by "
               f"{ev.stride}. Loss is in nats per token; bits per byte divides the total loss in bits by the "
               "text's UTF-8 bytes, so it compares across tokenizers where perplexity cannot.", "")
    report.add(*table(["model", "loss (nats/token)", "perplexity", "bits per byte"], rows))
    gain = baselines.unigram.ppl / ev.val_ppl
    if gain > 1:
        report.add(f"The trained model's perplexity is {number(gain, 1)}× lower than the best context-free guess "
                   "(unigram): that gap is what attention and depth buy.", "")
    else:
        report.add("The trained model does no better than the context-free unigram baseline: it has not yet "
                   "learned to use its context (train longer, or check the learning rate).", "")


def trim(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def sample_cell(prompt: str, completion: str, limit: int) -> str:
    """The prompt in bold (its surrounding spaces outside the markers, or markdown ignores them)
    followed by the completion trimmed to `limit` characters, escaped for a table cell."""
    core = prompt.strip()
    lead, tail = prompt[:len(prompt) - len(prompt.lstrip())], prompt[len(prompt.rstrip()):]
    bold = f"{escape(lead)}**{escape(core)}**{escape(tail)}" if core else escape(prompt)
    return bold + escape(trim(completion, limit))


def sampling_section(report: Report, metrics: SamplingReport, samples: list[GeneratedSample],
                     sample_chars: int) -> None:
    # The sweep's order (greedy, temperatures, truncations, searches), which samples.jsonl keeps;
    # sampling.json's keys are sorted alphabetically. A dict keeps each name where it first appears.
    configs = {name: metrics[name] for name in [*(s.config for s in samples if s.config in metrics), *metrics]}
    report.add("## Sampling", "",
               "Each decoding config on the same prompts and seeds. distinct-n: share of unique word n-grams "
               "per sample; rep-4: share of 4-grams repeating an earlier one; entropy: the model's next-token "
               "entropy along the text (nats); self-ppl: the model's perplexity of its own sample (low = text it "
               "finds likely); EOT: share of samples that ended the story.", "")
    report.add(*table(["config", "distinct-1", "distinct-2", "rep-4", "entropy", "self-ppl", "mean tokens", "EOT",
                       "samples"],
                      [[f"`{name}`", number(m.distinct_1, 3), number(m.distinct_2, 3), number(m.repetition_4, 3),
                        number(m.entropy, 3), number(m.self_ppl, 2), number(m.mean_length, 1), number(m.eot_rate, 2),
                        count(m.num_samples)] for name, m in configs.items()]))
    report.figure("diversity_coherence", figures.diversity_vs_coherence(
        {name: (m.distinct_2, m.self_ppl) for name, m in configs.items()}),
        "Distinct-2 against self-perplexity, one point per decoding config")
    report.add(f"Every sample, trimmed to {sample_chars} characters after the prompt (in bold); the full texts "
               "are in [samples.jsonl](samples.jsonl).", "")
    report.add(*table(["config", "seed", "sample"],
                      [[f"`{s.config}`", "–" if s.seed is None else s.seed,
                        sample_cell(s.prompt, s.completion, sample_chars)] for s in samples], numeric_from=3))


def attention_story(root: Path, tokenizer: Tokenizer, length: int) -> tuple[list[int], str]:
    """The first validation story's first tokens, after <|endoftext|> as every story is in training."""
    path = require(root, CLEAN_VAL)
    story = next(iter_eot_stories(path), None)
    if story is None:
        raise CLEAN_VAL.fail("holds no story")
    ids = [tokenizer.eot_id, *tokenizer.encode(story)][:length]
    return ids, tokenizer.decode(ids[1:])


def head_verdict(share: float, pattern: str) -> str:
    """Name a head's pattern only when it is clear: over half of its attention goes there."""
    return pattern if share > 0.5 else "too spread out to call it a specialised head"


def inside_section(report: Report, root: Path, attention_tokens: int) -> None:
    tokenizer = load_tokenizer(require(root, TOKENIZER_DIR))
    model = load_trained_model(require(root, MODEL_DIR), tokenizer.fingerprint, torch.device("cpu"))
    ids, text = attention_story(root, tokenizer, min(attention_tokens, model.config.block_size))
    probs = introspection.attention_probabilities(model, torch.tensor(ids))
    # Figure labels: DejaVu draws ␣ too small to read at 8 pt, so spaces show as a middle dot.
    labels = [tokenizer.decode([i]).replace(" ", "·").replace("\n", "↵") for i in ids]
    report.add("## Inside the model", "",
               f"Attention of every head on the first {len(ids)} tokens of the first validation story "
               "(after `<|endoftext|>`, as in training). Row = the query token, column = the token it attends "
               "to; blank cells are the future, which a causal model cannot see.", "", *code_block(text))
    report.figure("attention_heads", figures.attention_grid(probs.numpy()), "Attention heatmaps of every head")

    previous, first = introspection.attention_to_previous(probs), introspection.attention_to_first(probs)
    layer, head = divmod(int(previous.argmax()), model.config.n_head)
    sink_layer, sink_head = divmod(int(first.argmax()), model.config.n_head)
    previous_share, sink_share = float(previous[layer, head]), float(first[sink_layer, sink_head])
    previous_kind = head_verdict(previous_share, "a previous-token head, the first half of an induction circuit")
    sink_kind = head_verdict(sink_share, "an attention sink, where a head parks probability it does not need")
    report.add(f"Layer {layer} head {head} puts the most attention on the previous token: {previous_share:.0%} on "
               f"average ({previous_kind}). Layer {sink_layer} head {sink_head} puts the most on the first token: "
               f"{sink_share:.0%} ({sink_kind}).", "")
    report.figure("attention_previous_token_head", figures.attention_head(
        probs[layer, head].numpy(), labels, f"Layer {layer} head {head}: attention by token (· = space)"),
        "Attention of the strongest previous-token head, with tokens")

    matrices = introspection.weight_matrices(model)
    groups: dict[str, dict[str, np.ndarray]] = {}
    for m in matrices:
        title = {"wte": "wte (tokens; = LM head)" if model.config.tie_embeddings else "wte (tokens)",
                 "wpe": "wpe (position embedding)", "lm_head": "lm_head (untied LM head)"}.get(m.name, m.name)
        series = f"layer {m.layer}" if m.layer is not None else m.name
        groups.setdefault(title, {})[series] = m.weight.flatten().float().numpy()
    report.add("Weights: one histogram per matrix kind and layer (q, k and v are the parts of the fused qkv "
               "projection). Spectral norm = the largest singular value, the most a matrix can stretch a vector; "
               "a layer whose norms grow far beyond the others amplifies its input.", "")
    report.figure("weight_histograms", figures.weight_histograms(groups), "Weight histograms per matrix and layer")
    norms = introspection.spectral_norms(model)
    report.figure("spectral_norms", figures.spectral_norm_chart(norms),
                  "Spectral norm of each weight matrix per layer")
    report.add(*table(["layer", *norms], [[layer, *(number(values[layer], 3) for values in norms.values())]
                                          for layer in range(model.config.n_layer)]))
    outside = ", ".join(f"{m.name} {number(introspection.spectral_norm(m.weight), 3)}" for m in matrices
                        if m.layer is None)
    report.add(f"Embeddings and head: {outside}.", "")


# ---------------------------------------------------------------------------------------------


def build_report(root: Path, params: Params) -> Report:
    """The whole report in memory; `root` is the repository (inputs are read relative to it)."""
    provenance, clean = PROVENANCE.read(root, Provenance), CLEAN.read(root, CleanReport)
    tokenizer_stats, shards = TOKENIZER_REPORT.read(root, TokenizerReport), SHARDS.read(root, ShardsReport)
    summary = MODEL_SUMMARY.read(root, ModelSummary)
    metrics = TRAIN_METRICS.read(root, TrainMetrics, ignore_other_keys=True)
    milestones = TRAIN_SAMPLES.read_lines(root, MilestoneSample)
    ev = EVAL.read(root, EvalReport)
    sampling, samples = SAMPLING.read(root, SamplingReport), SAMPLES.read_lines(root, GeneratedSample)
    report = Report()
    report.add("# TinyStories GPT: pipeline report", "",
               f"Generated by the report stage from the pipeline's outputs. A {short(summary.params)}-parameter "
               f"GPT trained on {short(summary.tokens_trained)} tokens reaches a validation perplexity of "
               f"**{number(ev.val_ppl, 2)}** ({number(ev.val_bpb, 4)} bits per byte).", "",
               "Sections: [Data](#data) · [Tokenizer](#tokenizer) · [Model](#model) · [Training](#training) · "
               "[Evaluation](#evaluation) · [Sampling](#sampling) · [Inside the model](#inside-the-model)", "")
    data_section(report, provenance, clean, shards)
    tokenizer_section(report, tokenizer_stats, int(summary.config["d_model"]))
    model_section(report, summary, shards, metrics.batch_tokens)
    environment_note(report, MODEL_ENVIRONMENT.read(root, Environment), str(MODEL_ENVIRONMENT.path))
    training_section(report, root, metrics, summary, params.train.grad_clip, milestones, params.report.sample_chars)
    evaluation_section(report, ev)
    sampling_section(report, sampling, samples, params.report.sample_chars)
    inside_section(report, root, params.report.attention_tokens)
    return report


def write_report(root: Path, params: Params) -> Report:
    """Write every figure, then report.md (so it never links a figure not yet written); PNGs left
    in the figures folder by an earlier report that this one does not link are removed."""
    report = build_report(root, params)
    figure_dir = root / FIGURES
    for name, fig in report.figures.items():
        figures.save_figure(fig, figure_dir / name)
    for stale in figure_dir.glob("*.png"):
        if stale.name not in report.figures:
            stale.unlink()
    write_text(root / REPORT, report.markdown())
    return report
