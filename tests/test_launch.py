"""pretrain's launch (dvc.yaml runs it through tinylm.training.launch with torchrun's options from
train.nproc_per_node, train.nnodes and train.rdzv_endpoint): several processes, and several nodes, each
equal to one process with the same global batch, recorded by `dvc exp run` like any experiment; one
process (the default) is `python stages/pretrain.py` itself, writing its bytes and ending on its error
line; under several, the error lines are repeated after torchrun's summary; bad launch params fail
naming the key.

The end-to-end tests run the tiny profile in a temporary copy of the project, reproduced up to pretrain
once; each then runs `dvc exp run ... pretrain`. The two "nodes" are two copies of it on this machine,
each running the same `dvc exp run` (the README's multi-node recipe), meeting through c10d on 127.0.0.1.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import run_cmd
from test_workflow import back_to_baseline, commit, hub_unreachable, tiny_copy  # noqa: F401 (autouse: offline hub)
from tinylm.config import ParamError, parse_params
from tinylm.errors import PipelineError
from tinylm.training import checkpoint
from tinylm.training.checkpoint import check_ranks_agree, fingerprint_inputs, load_checkpoint, save_checkpoint
from tinylm.training.runtime import Distributed, check_launch
from trainer_helpers import CONFIG, TOKENIZER_FINGERPRINT, params

TOLERANCE = 1e-5  # the bound on every logged loss
LOSSES = ("train_loss", "val_loss")
MODEL_FILES = ("data/model/model.pt", "data/model/model.json")


# --- validation and the pieces of the launch, in-process -------------------------------------------


@pytest.fixture(scope="module")
def raw(repo_root):
    return yaml.safe_load((repo_root / "params.yaml").read_text())


def with_train(raw: dict, **changes) -> dict:
    changed = copy.deepcopy(raw)
    changed["train"].update(changes)
    return changed


@pytest.mark.parametrize("changes, key, words", [
    ({"nproc_per_node": 0}, "train.nproc_per_node", "must be >= 1, got 0"),
    ({"nnodes": 0}, "train.nnodes", "must be >= 1, got 0"),
    ({"rdzv_endpoint": "127.0.0.1"}, "train.rdzv_endpoint", "must be HOST:PORT"),
    ({"rdzv_endpoint": "node0:port"}, "train.rdzv_endpoint", "must be HOST:PORT"),
    ({"rdzv_endpoint": "node 0:29500"}, "train.rdzv_endpoint", "must be HOST:PORT"),
    ({"rdzv_endpoint": "node0:70000"}, "train.rdzv_endpoint", "port in [0, 65535]"),
    ({"nnodes": 2, "rdzv_endpoint": "127.0.0.1:0"}, "train.rdzv_endpoint", "works on one node only"),
])
def test_bad_launch_params_name_the_key_and_the_fix(raw, changes, key, words):
    with pytest.raises(ParamError) as error:
        parse_params(with_train(raw, **changes))
    message = str(error.value)
    assert message.startswith(f"{key}:") and words in message and "Fix:" in message, message


@pytest.mark.parametrize("endpoint", ["127.0.0.1:0", "node0.cluster.example:29500", "10.0.0.7:29500", "[::1]:29500"])
def test_endpoints_torchrun_accepts_are_accepted(raw, endpoint):
    assert parse_params(with_train(raw, rdzv_endpoint=endpoint)).train.rdzv_endpoint == endpoint


def test_the_cmds_first_command_rejects_a_bad_launch_naming_the_key(raw, tmp_path):
    # torchrun alone would fail on nproc_per_node 0 with a bare AssertionError.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_train(raw, nproc_per_node=0), sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "tinylm.config"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: params.yaml: train.nproc_per_node: must be >= 1")


def test_a_launch_other_than_the_params_is_refused():
    check_launch(params(nproc_per_node=2, nnodes=2, rdzv_endpoint="node0:29500"),
                 Distributed(rank=3, local_rank=1, world_size=4, local_world_size=2))
    with pytest.raises(PipelineError, match=r"^train.nproc_per_node is 1, but this node runs 8 of 8 process"):
        check_launch(params(), Distributed(world_size=8, local_world_size=8))
    with pytest.raises(PipelineError, match=r"^train.nnodes is 1 \(2 process\(es\) each\), but this node runs 2 of 4"):
        check_launch(params(nproc_per_node=2), Distributed(world_size=4, local_world_size=2))


def test_one_writer_per_node():
    assert [Distributed(rank, rank % 2, 4, 2).writes_outputs for rank in range(4)] == [True, False, True, False]


LAUNCH = [sys.executable, "-m", "tinylm.training.launch", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"]
STAGE_SCRIPT = """\
import os, sys
from tinylm.errors import PipelineError, run_stage

def main():
    # One write per line: torchrun's processes run unbuffered (PYTHONUNBUFFERED=1) on one shared pipe, and
    # print() writes the text and its newline separately, so two ranks' lines could interleave.
    sys.stdout.write(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}, pid {os.getpid()}, "
                     f"argv {sys.argv[1:]}\\n")
    if sys.argv[1:] == ["fail"]:
        raise PipelineError("the loss is nan at step 3: training diverged. Fix: lower train.lr")

run_stage(main)
"""


def run_launcher(tmp_path: Path, nproc: int, *script_args: str) -> subprocess.CompletedProcess:
    """The launcher, as dvc.yaml runs it, on a stage script that prints where it runs and fails on `fail`."""
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    return subprocess.run([*LAUNCH, "--nnodes", "1", "--nproc_per_node", str(nproc), "stage.py", *script_args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_one_process_is_the_script_itself_ending_on_its_error_line(tmp_path):
    done = run_launcher(tmp_path, 1, "fail")
    plain = subprocess.run([sys.executable, "stage.py", "fail"], cwd=tmp_path, capture_output=True, text=True)
    # exec: the same process (its pid printed), no torchrun environment, the same output as plain python
    assert done.returncode == plain.returncode == 2
    assert done.stdout.startswith("rank None of None, pid ") and done.stdout.endswith(", argv ['fail']\n")
    assert done.stderr == plain.stderr == ("error: the loss is nan at step 3: training diverged. Fix: lower "
                                           "train.lr\n")


def test_several_processes_repeat_their_error_line_after_torchruns_summary(tmp_path):
    done = run_launcher(tmp_path, 2, "fail")
    error = "error: the loss is nan at step 3: training diverged. Fix: lower train.lr"
    assert done.returncode == 2, done.stderr
    assert sorted(line.split(",")[0] for line in done.stdout.splitlines()) == ["rank 0 of 2", "rank 1 of 2"]
    lines = done.stderr.splitlines()
    assert lines[-1] == error and lines[-2].startswith("=====")  # after the summary, once though both failed
    assert lines.count(error) == 3 and "stage.py FAILED" in done.stderr and "Traceback" not in done.stderr
    succeeded = run_launcher(tmp_path, 2)
    assert succeeded.returncode == 0 and "error" not in succeeded.stderr, succeeded.stderr
    assert len(succeeded.stdout.splitlines()) == 2


def test_a_stage_writes_its_error_line_in_one_write(monkeypatch):
    # Ranks share torchrun's stderr pipe: a line written in two pieces (print's text, then its newline)
    # interleaves with another rank's into "error: Xerror: X", and the launcher repeats that line.
    from tinylm.errors import run_stage

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return super().write(text)

    recorder = Recorder()
    monkeypatch.setattr(sys, "stderr", recorder)

    def fail():
        raise PipelineError("the loss is nan at step 3")

    with pytest.raises(SystemExit) as stopped:
        run_stage(fail)
    assert stopped.value.code == 2 and recorder.writes == ["error: the loss is nan at step 3\n"]


def inputs_for(world_size: int, **launch) -> dict:
    return fingerprint_inputs(CONFIG, params(**launch), device_type="cpu", precision="fp32", world_size=world_size,
                              tokenizer_fingerprint=TOKENIZER_FINGERPRINT, data_hashes={"train": "t", "val": "v"})


def test_a_checkpoint_resumes_on_any_layout_of_its_world_size_only(tmp_path, capsys):
    # Two processes on one node or one on each of two nodes: the same run, wherever they meet.
    assert inputs_for(2, nproc_per_node=2) == inputs_for(2, nnodes=2, rdzv_endpoint="node0:29500")
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"fingerprint": checkpoint.fingerprint(inputs_for(1)), "fingerprint_inputs": inputs_for(1)})
    assert load_checkpoint(path, inputs_for(1)) is not None
    # Another world size is another global batch and another set of per-rank RNG states: start over.
    assert load_checkpoint(path, inputs_for(2, nproc_per_node=2)) is None and not path.exists()
    assert "world_size: 1 -> 2" in capsys.readouterr().out


def test_ranks_with_other_params_or_data_refuse_to_train_together(monkeypatch):
    theirs = inputs_for(2, nproc_per_node=2)
    theirs["train"]["lr"] = 1.0
    theirs["data"]["train"] = "other shards"

    def gather(everyone, mine):  # what all_gather_object hands rank 0 when rank 1's node differs
        everyone[:] = [mine, theirs]

    monkeypatch.setattr(checkpoint.dist, "all_gather_object", gather)
    with pytest.raises(PipelineError, match=r"^rank 1 is not training the same run as rank 0 \(data.train: 't' -> "
                                        r"'other shards'; train.lr: 0.003 -> 1.0\)\. Fix: give every node the same"):
        check_ranks_agree(inputs_for(2, nproc_per_node=2), Distributed(world_size=2, local_world_size=2))


# --- end to end: dvc exp run in a copy of the project ------------------------------------------------


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A copy of the project on the tiny profile, reproduced up to pretrain (the default launch) and committed;
    and dvc repro's output."""
    repo = tiny_copy(tmp_path_factory.mktemp("launch"))
    output = run_cmd(["dvc", "repro", "pretrain"], repo)
    commit(repo, "reproduced")
    return repo, output


@pytest.fixture
def pipeline(reproduced):
    """That copy, back at its committed state (the tests apply experiments to its workspace). Function-scoped,
    so pytest sets it up after the module-scoped fixtures, which apply their own."""
    repo, _ = reproduced
    back_to_baseline(repo, "pretrain")
    return repo


def exp_run(repo: Path, *overrides: str, name: str) -> str:
    """`dvc exp run` of pretrain (its upstream is up to date) with the tiny profile and the overrides."""
    sets = [arg for override in ("profile=tiny", *overrides) for arg in ("-S", override)]
    return run_cmd(["dvc", "exp", "run", *sets, "-n", name, "pretrain"], repo, timeout=300)


def logged_losses(repo: Path) -> dict[str, dict[int, float]]:
    """train_loss and val_loss as dvclive wrote them, {name: {step: value}}; a repeated step (two writers) fails."""
    losses = {}
    for name in LOSSES:
        with open(repo / f"reports/train/plots/metrics/{name}.tsv", newline="") as f:
            rows = [(int(row["step"]), float(row[name])) for row in csv.DictReader(f, delimiter="\t")]
        assert len(rows) == len(dict(rows)), f"{name} repeats steps: {rows}"
        losses[name] = dict(rows)
    return losses


def largest_difference(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]) -> float:
    for name in LOSSES:
        assert a[name].keys() == b[name].keys(), name
    return max(abs(a[name][step] - b[name][step]) for name in LOSSES for step in a[name])


def experiments(repo: Path) -> dict[str, dict]:
    shown = json.loads(run_cmd(["dvc", "exp", "show", "--json"], repo))
    return {exp["name"]: exp["revs"][0]["data"] for row in shown for exp in row.get("experiments") or []}


def launch_params(experiment: dict) -> tuple[int, int, str]:
    train = experiment["params"]["params.yaml"]["data"]["train"]
    return train["nproc_per_node"], train["nnodes"], train["rdzv_endpoint"]


@pytest.fixture(scope="module")
def two_processes(reproduced):
    """The 2-process single-node run (`-S train.nproc_per_node=2`): its output and losses."""
    repo, _ = reproduced
    back_to_baseline(repo, "pretrain")
    output = exp_run(repo, "train.nproc_per_node=2", name="nproc2")
    return output, logged_losses(repo)


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_accumulation(pipeline, two_processes):
    output, losses = two_processes
    assert "--nnodes 1 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:0" in output, output
    assert "| 2 process(es) |" in output and output.count("model:") == 1, output  # one process prints, and writes
    exp_run(pipeline, "train.grad_accum_steps=2", name="accum2")
    difference = largest_difference(losses, logged_losses(pipeline))
    print(f"nproc_per_node=2 vs grad_accum_steps=2: largest loss difference {difference:.3g}")
    assert difference <= TOLERANCE
    runs = experiments(pipeline)
    assert launch_params(runs["nproc2"]) == (2, 1, "127.0.0.1:0") and launch_params(runs["accum2"])[0] == 1
    assert runs["nproc2"]["metrics"]["reports/train/metrics.json"]["data"]["batch_tokens"] == \
        runs["accum2"]["metrics"]["reports/train/metrics.json"]["data"]["batch_tokens"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_two_processes_on_one_node(pipeline, two_processes, tmp_path, shared_dir):
    _, single_node_losses = two_processes
    nodes = []
    for index in range(2):  # each node its own clone of the project, beside its own ../shared
        shutil.copytree(pipeline, tmp_path / f"node{index}" / "repo", symlinks=True)
        (tmp_path / f"node{index}" / "shared").symlink_to(shared_dir)
        nodes.append(tmp_path / f"node{index}" / "repo")
    launch = ("train.nnodes=2", f"train.rdzv_endpoint=127.0.0.1:{free_port()}")
    with ThreadPoolExecutor(2) as pool:  # the same command on each node, at the same time
        outputs = list(pool.map(lambda node: exp_run(node, *launch, name="two-nodes"), nodes))

    for node, output in zip(nodes, outputs):
        assert "--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d" in output, output
        assert output.count("model:") == 1, output  # one writer on each node
        difference = largest_difference(single_node_losses, logged_losses(node))
        print(f"{node.parent.name} vs one node with 2 processes: largest loss difference {difference:.3g}")
        assert difference <= TOLERANCE
        assert launch_params(experiments(node)["two-nodes"])[:2] == (1, 2)
    # Every rank holds the same weights: both nodes' workspaces get the same model, bit for bit.
    assert all((nodes[0] / name).read_bytes() == (nodes[1] / name).read_bytes() for name in MODEL_FILES)


@pytest.mark.slow
def test_one_process_by_default_writes_what_plain_python_writes(reproduced, pipeline):
    _, output = reproduced
    assert "> python -m tinylm.training.launch --nnodes 1 --nproc_per_node 1" in output, output
    through_torchrun = {name: (pipeline / name).read_bytes() for name in MODEL_FILES}
    losses = logged_losses(pipeline)
    run_cmd([sys.executable, "stages/pretrain.py"], pipeline)
    assert through_torchrun == {name: (pipeline / name).read_bytes() for name in MODEL_FILES}
    assert losses == logged_losses(pipeline)


@pytest.mark.slow
def test_a_diverging_dvc_exp_run_ends_with_its_one_line_before_dvcs(pipeline):
    # Issue 18: the line was followed by torchrun's 30-line ChildFailedError traceback.
    with pytest.raises(pytest.fail.Exception) as failed:
        exp_run(pipeline, "train.lr=1000", "train.muon_lr=1000", name="diverged")
    output = str(failed.value)
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    ours, theirs = [line for line in output.splitlines() if "error:" in line.lower()][-2:]
    assert ours.startswith("error: the loss is") and "training diverged" in ours and "Fix: lower train.lr" in ours
    assert theirs.startswith("ERROR: failed to reproduce 'pretrain'"), output


@pytest.mark.slow
def test_dvc_exp_run_with_a_bad_launch_param_names_it(pipeline):
    with pytest.raises(pytest.fail.Exception) as failed:
        exp_run(pipeline, "train.nproc_per_node=0", name="bad")
    output = str(failed.value)
    assert "error: params.yaml: train.nproc_per_node: must be >= 1, got 0" in output, output
    assert "> python -m tinylm.training.launch" not in output, output  # stopped before the launch


def test_the_launcher_runs_a_module_as_torchrun_does():
    from tinylm.training.launch import parse_args, torchrun_args

    options = ["--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "h:1"]
    assert torchrun_args(parse_args([*options, "-m", "stages.pretrain", "x"]))[-3:] == ["-m", "stages.pretrain", "x"]
    assert torchrun_args(parse_args([*options, "stages/pretrain.py"]))[-1:] == ["stages/pretrain.py"]
