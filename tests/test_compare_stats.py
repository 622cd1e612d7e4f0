"""tinylm compare's statistics and grouping, against independent computations (no DVC runs here)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from tinylm.errors import PipelineError
from tinylm.experiments import groups as grouping
from tinylm.experiments.runs import Run, declared_params, frame, group_key, resolve_metric
from tinylm.experiments.stats import paired_bootstrap_bpb, spread, verdict, welch

# Welch's t-test, Wikipedia's worked example 1 ("Welch's t-test", Examples): t = -2.46, nu = 25.0, p = 0.021.
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_matches_the_published_example_and_the_textbook_formula():
    d = welch(A1, A2)
    assert d.p_value == pytest.approx(0.021, abs=5e-4)
    assert d.df == pytest.approx(25.0, abs=0.05)
    a, b = np.array(A1), np.array(A2)
    se2 = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    assert (a.mean() - b.mean()) / math.sqrt(sum(se2)) == pytest.approx(-2.46, abs=0.005)
    # Welch-Satterthwaite degrees of freedom and the CI of the difference, by hand.
    df = sum(se2) ** 2 / (se2[0] ** 2 / (len(a) - 1) + se2[1] ** 2 / (len(b) - 1))
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(sum(se2))
    assert d.diff == pytest.approx(a.mean() - b.mean())
    assert (d.ci_low, d.ci_high) == pytest.approx((d.diff - half, d.diff + half))
    assert d.verdict == "better"  # A1 is lower, and lower is better by default
    assert welch(A1, A2, lower_is_better=False).verdict == "worse"
    assert welch(A1[:4], A2[:4]).verdict == "no detectable difference at 5%"


def test_spread_is_the_t_interval_of_the_mean():
    values = [0.9102, 0.9083, 0.9055, 0.9121, 0.9077]
    s = spread(values)
    half = scipy_stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / math.sqrt(5)
    assert (s.n, s.mean, s.sd) == (5, pytest.approx(np.mean(values)), pytest.approx(np.std(values, ddof=1)))
    assert (s.ci_low, s.ci_high) == pytest.approx((s.mean - half, s.mean + half))
    one = spread([0.9])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.ci_low)


def test_verdicts_and_bit_identical_reruns():
    assert verdict(-0.01, 0.01, lower_is_better=True) == "better"
    assert verdict(-0.01, 0.2, lower_is_better=True) == "no detectable difference at 5%"
    assert verdict(0.01, 0.049, lower_is_better=True) == "worse"
    same = welch([0.9, 0.9], [0.9, 0.9])
    assert (same.diff, same.p_value, same.verdict) == (0.0, 1.0, "no detectable difference at 5%")
    assert welch([0.8, 0.8], [0.9, 0.9]).verdict == "better"
    with pytest.raises(ValueError):
        welch([0.9], [0.9, 0.91])


def _coverage(confidence: float, trials: int = 200) -> float:
    """How often the paired bootstrap CI holds the true bpb difference of synthetic story scores.
    Story i has b_i bytes and NLL ln2 * b_i * (bpb + e_i) under each model, with correlated noise e_i (the
    same stories are hard for both), so the corpus difference's expectation is exactly bpb_a - bpb_b."""
    rng = np.random.default_rng(1234)
    true_diff, hits = 0.03, 0
    for _ in range(trials):
        size = rng.integers(200, 2000, 60).astype(np.float64)
        hard = rng.normal(0, 0.15, 60)
        nll_a = math.log(2) * size * (1.00 + true_diff + hard + rng.normal(0, 0.05, 60))
        nll_b = math.log(2) * size * (1.00 + hard + rng.normal(0, 0.05, 60))
        result = paired_bootstrap_bpb(nll_a, nll_b, size, resamples=999, seed=int(rng.integers(1 << 30)),
                                      confidence=confidence)
        hits += result.ci_low <= true_diff <= result.ci_high
    return hits / trials


def test_paired_bootstrap_covers_the_true_difference_about_95_percent_of_the_time():
    # 200 trials: a correct 95% interval covers 95% +- 1.5% (one binomial sd); [91%, 98.5%] is about 2.5 sd.
    assert 0.91 <= _coverage(0.95) <= 0.985
    # The check has teeth: an interval too narrow (a 70% one labelled as 95%) fails it.
    assert _coverage(0.70) < 0.91


def test_paired_bootstrap_reports_the_corpus_bpb_of_both_models():
    size = np.array([100.0, 300.0, 600.0])
    nll_a, nll_b = math.log(2) * size * 1.2, math.log(2) * size * np.array([1.0, 1.1, 1.0])
    result = paired_bootstrap_bpb(nll_a, nll_b, size, resamples=200)
    assert result.bpb_a == pytest.approx(1.2)
    assert result.bpb_b == pytest.approx((100 + 330 + 600) / 1000)
    assert result.diff == pytest.approx(result.bpb_a - result.bpb_b)


BASE = {"train.seed": 1, "train.lr": 0.004, "model.n_layer": 3, "train.checkpoint_interval": 100,
        "clean.workers": 2, "train.rdzv_endpoint": "127.0.0.1:0", "train.nproc_per_node": 1}
DECLARED = ["model", "train.lr", "train.seed", "train.nproc_per_node", "train.rdzv_endpoint"]


def run(name: str, state: str = "success", bpb: float | None = 0.9, **changes) -> Run:
    params = {**BASE, **{k.replace("__", "."): v for k, v in changes.items()}}
    metrics = {} if bpb is None else {"reports/eval.json:val_bpb": bpb}
    return Run(name, f"{name}-sha", "experiment", state, params, metrics)


def test_the_declared_params_come_from_dvc_yaml(repo_root: Path):
    declared = declared_params(repo_root / "dvc.yaml")
    assert {"model", "train.lr", "train.seed", "train.nproc_per_node", "eval", "sample"} <= set(declared)
    assert not {"clean.workers", "train.checkpoint_interval", "train.activation_checkpointing"} & set(declared)


def test_runs_differing_only_in_seed_or_execution_only_params_group_together():
    runs = [run("a"), run("b", train__seed=2), run("c", train__checkpoint_interval=7, clean__workers=1),
            run("d", train__rdzv_endpoint="10.0.0.1:29500", train__seed=3),
            run("e", train__lr=0.002), run("f", model__n_layer=4), run("g", train__nproc_per_node=2)]
    table = frame(runs, DECLARED)
    assert table.loc[table["name"].isin(["a", "b", "c", "d"]), "group"].nunique() == 1
    assert table["group"].nunique() == 4  # lr, n_layer and the world size each split
    assert group_key(runs[0].params, DECLARED) == group_key(runs[1].params, DECLARED)


def test_unfinished_runs_are_listed_not_averaged_and_n1_gets_no_verdict():
    runs = [run("a", bpb=0.90), run("b", bpb=0.91, train__seed=2), run("c", bpb=0.50, state="failed"),
            run("d", bpb=0.10, state="queued"), run("e", bpb=0.80, train__lr=0.002),
            run("f", bpb=0.81, train__lr=0.002, train__seed=2), run("g", bpb=0.7, model__n_layer=4)]
    table = frame(runs, DECLARED)
    groups = grouping.summarise(table, "reports/eval.json:val_bpb", baseline_group=0, floors=[], references={})
    base = next(g for g in groups if g.baseline)
    assert base.runs == ["a", "b"] and base.metric.mean == pytest.approx(0.905)
    lr = next(g for g in groups if g.runs == ["e", "f"])
    assert lr.vs_baseline.verdict == "better" and lr.diff == pytest.approx(-0.1)
    single = next(g for g in groups if g.runs == ["g"])
    assert single.vs_baseline is None and single.note.startswith("n = 1 on a side")
    floor = grouping.NoiseFloor(label="recipe=modern", metric="reports/eval.json:val_bpb", params=base.params,
                                runs={"a": 0.9, "b": 0.91}, seeds={"a": 1337, "b": 2}, n=2, mean=0.905, sd=0.00707)
    with_floor = grouping.summarise(table, "reports/eval.json:val_bpb", 0, [floor], references={})
    assert "seed sd of recipe=modern: 0.0071 (n = 2)" in next(g for g in with_floor if g.runs == ["g"]).note


def test_a_seed_counts_once_in_its_group_and_its_repeats_are_named():
    # "main" and the workspace hold the same run (their stage reports differ, so both are listed); "x1"
    # reran seed 1 in another clone. Two draws of the seed noise, not four: n = 2, not a zero-sd n = 4.
    runs = [dataclasses.replace(run("workspace", bpb=0.90, train__seed=1337), kind="workspace"),
            dataclasses.replace(run("main", bpb=0.90, train__seed=1337), kind="commit"),
            run("x1", bpb=0.92, train__seed=1), run("x1-again", bpb=0.93, train__seed=1),
            run("lr1", bpb=0.80, train__lr=0.002, train__seed=1), run("lr2", bpb=0.81, train__lr=0.002, train__seed=2)]
    table = frame(runs, DECLARED)
    groups = grouping.summarise(table, "reports/eval.json:val_bpb", baseline_group=0, floors=[], references={})
    base = next(g for g in groups if g.baseline)
    assert sorted(base.runs) == ["main", "x1"] and sorted(base.seeds) == [1, 1337]
    assert base.repeats == {"workspace": "main", "x1-again": "x1"}  # the branch's name is kept: it means the same everywhere
    assert (base.metric.n, base.metric.mean) == (2, pytest.approx(0.91)) and base.metric.sd > 0.01
    lr = next(g for g in groups if not g.baseline)
    assert lr.repeats == {} and lr.vs_baseline.verdict == "better"
    welch_on_distinct = welch([0.80, 0.81], [0.90, 0.92])
    assert lr.vs_baseline.p_value == pytest.approx(welch_on_distinct.p_value)


def test_markdown_tables_end_before_the_lines_under_them():
    # GitHub's tables run until a blank line: a note right under the last row would be read as a row.
    import io

    from tinylm.cli.compare import _print_tables

    runs = [run("main", bpb=0.90), run("workspace", bpb=0.90), run("b", bpb=0.91, train__seed=2),
            run("q", state="queued", train__lr=0.002)]
    table = frame(runs, DECLARED)
    groups = grouping.summarise(table, "reports/eval.json:val_bpb", baseline_group=0, floors=[], references={})
    out = io.StringIO()
    _print_tables(groups, "reports/eval.json:val_bpb", [{"group": "lr", "state": "queued"}], markdown=True, out=out)
    lines = out.getvalue().splitlines()
    assert sum(line.startswith("| group") for line in lines) == 2
    for line, after in zip(lines, lines[1:]):
        assert not (line.startswith("|") and after and not after.startswith("|")), (line, after)
    assert any(line.startswith("† depends") for line in lines) and any("workspace (repeats main)" in line for line in lines)


def test_a_noise_floor_grows_across_sessions_and_counts_each_seed_once():
    metric = "reports/eval.json:val_bpb"
    earlier = [run("old1", bpb=0.90, train__seed=1), run("old2", bpb=0.92, train__seed=2),
               run("lr1", bpb=0.80, train__lr=0.002, train__seed=1),
               run("lr2", bpb=0.82, train__lr=0.002, train__seed=2)]
    table = frame(earlier, DECLARED)
    first = grouping.noise_floors(grouping.summarise(table, metric, 0, [], {}), metric,
                                  dict(zip(table["name"], table[metric])))
    assert sorted(f.n for f in first) == [2, 2]
    # A later session, another clone: seed 2 run again (on another machine), seed 3 new, one lone lr run.
    later = [run("new2", bpb=0.96, train__seed=2), run("new3", bpb=0.94, train__seed=3),
             run("lr3", bpb=0.70, train__lr=0.003, train__seed=1)]
    table = frame(later, DECLARED)
    merged = grouping.noise_floors(grouping.summarise(table, metric, 0, [], {}), metric,
                                   dict(zip(table["name"], table[metric])), earlier=first)
    base = next(f for f in merged if "old1" in f.runs)
    assert base.runs == {"old1": 0.90, "new2": 0.96, "new3": 0.94} and base.seeds == {"old1": 1, "new2": 2, "new3": 3}
    assert (base.n, base.mean) == (3, pytest.approx(0.9333333)) and base.sd == pytest.approx(0.0305505, rel=1e-5)
    assert next(f for f in merged if "lr1" in f.runs).n == 2  # untouched entries stay
    assert not any("lr3" in f.runs for f in merged)  # one run of a new config is no noise floor


def test_bad_metric_and_baseline_are_one_named_error():
    runs = [run("a"), run("b", bpb=None, train__seed=2)]
    table = frame(runs, DECLARED)
    with pytest.raises(PipelineError, match="missing in run\\(s\\) b"):
        grouping.summarise(table, "reports/eval.json:val_bpb", 0, [], {})
    with pytest.raises(PipelineError, match="--baseline nosuch: no run is called that"):
        grouping.choose_baseline(table, "nosuch", ())
    with pytest.raises(PipelineError, match="--metric val_los: no run has it"):
        resolve_metric(runs, "val_los")
    assert resolve_metric(runs, "val_bpb") == "reports/eval.json:val_bpb"


def test_labels_name_the_nearest_recipe_and_what_differs():
    references = {"recipe=modern": {"model.n_layer": "3", "train.lr": "0.004"},
                  "recipe=baseline": {"model.n_layer": "4", "train.lr": "0.001"}}
    assert grouping.label({"model.n_layer": "3", "train.lr": "0.002"}, references) == "recipe=modern, train.lr=0.002"
    assert grouping.label({"model.n_layer": "4", "train.lr": "0.001"}, references) == "recipe=baseline"
    # A run made before train.lr existed: named by what it has, unless that would be ambiguous.
    assert grouping.label({"model.n_layer": "4"}, references) == "recipe=baseline"
    assert grouping.label({"model.n_layer": "4"}, references, verbose=True) == "recipe=baseline (without train.lr)"


def test_story_scores_add_up_to_the_whole_stream_and_split_at_the_boundaries(tmp_path):
    import torch

    from tinylm.evaluate import summarize, token_byte_lengths, token_nll
    from tinylm.experiments.paired import story_scores
    from tinylm.model import GPT, GPTConfig
    from tinylm.tokenizer.bpe import Tokenizer
    from tinylm.tokenizer.train import train_bpe

    (tmp_path / "train.txt").write_text("Once upon a time there was a cat. The cat sat on a mat. " * 20)
    tokenizer = Tokenizer(*train_bpe(tmp_path / "train.txt", 300, ["<|endoftext|>"]), ["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    stories = ["Once upon a time.", "The cat sat on a mat, and then it sat again.", "A cat."]
    scores = story_scores(model, tokenizer, stories, stride=16, batch_size=4, desc="t")
    stream = np.array([tokenizer.eot_id, *(t for s in stories for t in (*tokenizer.encode(s), tokenizer.eot_id))])
    whole = token_nll(model, stream, 16, 4)
    assert scores.nll.sum() == pytest.approx(whole.sum())
    assert list(scores.num_bytes) == [len(s.encode()) + 1 for s in stories]
    first = len(tokenizer.encode(stories[0])) + 1
    assert scores.nll[0] == pytest.approx(whole[:first].sum())
    total = summarize(whole, int(token_byte_lengths(tokenizer)[stream[1:]].sum()))
    assert scores.nll.sum() / math.log(2) / scores.num_bytes.sum() == pytest.approx(total.bpb)


def test_a_queue_task_vanishing_mid_listing_is_one_named_error(repo_root: Path, monkeypatch):
    from dvc.repo.experiments import Experiments

    from tinylm.experiments.runs import collect

    def vanished(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", ".dvc/tmp/exps/run/abc/abc.run")

    monkeypatch.setattr(Experiments, "show", vanished)
    with pytest.raises(PipelineError, match=r"DVC cannot list the runs of .*abc\.run"):
        collect(repo_root)
