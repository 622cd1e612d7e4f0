"""params.yaml: typed loading, validation that names the key, and the Hydra profiles."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tinylm.model import GPT, GPTConfig
from tinylm.config import ParamError, load_params, parse_params


@pytest.fixture(scope="module")
def raw(repo_root):
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def compose_params(repo_root, overrides=()):
    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base=None):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)))


def test_params_yaml_loads(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.model.d_model % params.model.n_head == 0
    assert isinstance(params.train.lr, float)


def test_params_yaml_is_the_cpu_profile_composed(repo_root, raw):
    # `dvc repro` reads params.yaml, `dvc exp run` composes conf/: they must agree.
    assert compose_params(repo_root) == raw


def test_gpu_profile_selects_gpt28m(repo_root):
    params = parse_params(compose_params(repo_root, ["profile=gpu", "recipe=baseline"]))
    assert (params.model.n_layer, params.model.n_head, params.model.block_size) == (6, 6, 256)
    assert params.tokenizer.vocab_size == 8192
    with torch.device("meta"):
        model = GPT(GPTConfig.from_params(params.model, params.tokenizer.vocab_size))
    assert 27e6 < model.num_params() < 30e6  # "gpt28m"
    assert params.train.precision == "bf16" and params.train.micro_batch_size == 64


@pytest.mark.parametrize("profile", ["cpu", "gpu", "tiny"])
@pytest.mark.parametrize("recipe", ["baseline", "modern"])
def test_every_recipe_composes_with_every_profile(repo_root, recipe, profile):
    # The profile sizes the model (it comes last); the recipe's axes must fit any size it picks.
    params = parse_params(compose_params(repo_root, [f"recipe={recipe}", f"profile={profile}"]))
    with torch.device("meta"):
        model = GPT(GPTConfig.from_params(params.model, params.tokenizer.vocab_size))
    assert model(torch.zeros(1, 4, dtype=torch.long, device="meta")).logits.shape == (1, 4, params.tokenizer.vocab_size)
    if profile == "gpu":
        assert params.train.device == "cuda" and params.model.d_model == 576


def test_the_baseline_recipe_is_the_gpt2_default_of_before_the_recipes(repo_root):
    # `-S recipe=baseline` must reproduce the old default to the last digit: every key it had, unchanged.
    before = yaml.safe_load((repo_root / "tests/fixtures/params_before_recipes.yaml").read_text())
    baseline = compose_params(repo_root, ["recipe=baseline"])
    for section, values in before.items():
        assert {key: baseline[section][key] for key in values} == values, section
    params = parse_params(baseline)
    assert (params.model.positions, params.model.norm, params.model.mlp, params.train.optimizer) == (
        "learned", "layernorm", "gelu", "adamw")
    assert params.model.tie_embeddings and not params.model.qk_norm and not params.model.logit_softcap


def test_hydra_override_of_one_key(repo_root):
    params = parse_params(compose_params(repo_root, ["train.lr=6e-4"]))
    assert params.train.lr == pytest.approx(6e-4)


@pytest.mark.parametrize("written", ["6e-4", "6.0e-4", 0.0006, "0.0006"])
def test_floats_load_either_way(raw, written):
    changed = copy.deepcopy(raw)
    changed["train"]["lr"] = written
    assert parse_params(changed).train.lr == pytest.approx(6e-4)


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["train"].update(lr_typo=1.0), "train.lr_typo"),
    (lambda r: r.update(extra={}), "extra"),
    (lambda r: r["train"].pop("lr"), "train.lr"),
    (lambda r: r["train"].update(max_steps="many"), "train.max_steps"),
    (lambda r: r["train"].update(max_steps=1.5), "train.max_steps"),
    (lambda r: r["train"].update(compile="yes"), "train.compile"),
    (lambda r: r["train"].update(lr=-1.0), "train.lr"),
    (lambda r: r["train"].update(precision="fp8"), "train.precision"),
    (lambda r: r["model"].update(d_model=130), "model.d_model"),
    (lambda r: r["tokenizer"].update(vocab_size=100), "tokenizer.vocab_size"),
    (lambda r: r["tokenizer"].update(vocab_size=70000), "tokenizer.vocab_size"),
    (lambda r: r["tokenizer"].update(special_tokens=["<|endoftext|>", ""]), "tokenizer.special_tokens[1]"),
    (lambda r: r["sample"].update(top_p=[0.9, 1.5]), "sample.top_p[1]"),
    (lambda r: r["sample"].update(temperatures=[0.0]), "sample.temperatures[0]"),
    (lambda r: r["data"].update(sources=[]), "data.sources"),
    (lambda r: r["data"].update(story_start_regex="(unclosed"), "data.story_start_regex"),
    (lambda r: r["clean"].update(max_chars=10), "clean.max_chars"),
    (lambda r: r["eval"].update(stride=100000), "eval.stride"),
    (lambda r: r["train"].update(sample_interval=-1), "train.sample_interval"),
    (lambda r: r["train"].update(sample_tokens=0), "train.sample_tokens"),
    (lambda r: r["train"].update(sample_prompts=[]), "train.sample_prompts"),
    (lambda r: r["train"].update(sample_prompts="Once upon a time"), "train.sample_prompts"),
])
def test_bad_params_name_the_key(raw, mutate, key):
    changed = copy.deepcopy(raw)
    mutate(changed)
    with pytest.raises(ParamError) as error:
        parse_params(changed)
    assert str(error.value).startswith(f"{key}:"), str(error.value)


def test_milestone_stories_are_on_by_default_cheap_in_the_tiny_profile_and_can_be_switched_off(repo_root, raw):
    cpu = parse_params(raw).train
    assert cpu.sample_interval == cpu.eval_interval and cpu.sample_prompts == parse_params(raw).sample.prompts
    tiny = parse_params(compose_params(repo_root, ["profile=tiny"])).train
    assert tiny.sample_interval == tiny.eval_interval and tiny.sample_tokens < cpu.sample_tokens
    off = copy.deepcopy(raw)
    off["train"].update(sample_interval=0, sample_prompts=[])  # no prompts needed when nothing is sampled
    assert parse_params(off).train.sample_interval == 0


def test_split_files_source_form(raw):
    changed = copy.deepcopy(raw)
    changed["data"]["sources"] = [{"train": "a.txt", "validation": "b.txt"}, "some/dataset"]
    sources = parse_params(changed).data.sources
    assert sources[0].train == "a.txt" and sources[1] == "some/dataset"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
