"""README.md and docs/ stay true: every relative link (and its #anchor) resolves, and every command shown
with its real output (a `$ ` line in a code block) still exists: the `tinylm` subcommand and its flags,
checked by the command's own parser, and `dvc` commands by DVC's parser, their stage names against dvc.yaml
and their `-S` overrides against params.yaml and conf/."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def without_code(text: str) -> str:
    """The prose: fenced blocks and inline code hold examples, not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


def links(path: Path) -> list[str]:
    found = [a or b for a, b in LINK.findall(without_code(path.read_text(encoding="utf-8")))]
    return [link for link in found if not re.match(r"[a-z]+:", link)]  # http(s)://, mailto: are not ours


def shown_commands(root: Path) -> list[tuple[str, list[str]]]:
    """(where, argv) of each `$ ` line in a code block: a command shown with the output it printed."""
    found = []
    for path in documents(root):
        for block in FENCE.findall(path.read_text(encoding="utf-8")):
            for line in block.splitlines():
                if line.startswith("$ "):
                    found.append((f"{path.relative_to(root)}: {line}", shlex.split(line[2:], comments=True)))
    return found


def test_every_page_is_linked_from_the_readme(repo_root):
    linked = {(repo_root / link.split("#")[0]).resolve() for link in links(repo_root / "README.md")}
    pages = set(documents(repo_root)[1:])
    assert not {p for p in pages if p.resolve() not in linked}, "link every docs/ page from the README"


def test_the_readme_is_a_short_manual(repo_root):
    assert len((repo_root / "README.md").read_text(encoding="utf-8").splitlines()) <= 320


@pytest.mark.parametrize("name", ["README.md", "docs"])
def test_every_relative_link_and_anchor_resolves(repo_root, name):
    broken = []
    for path in documents(repo_root):
        if (path.name == "README.md") != (name == "README.md"):
            continue
        for link in links(path):
            target, _, fragment = link.partition("#")
            resolved = (path.parent / target).resolve() if target else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(repo_root)}: {link} (no such file)")
            elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
                broken.append(f"{path.relative_to(repo_root)}: {link} (no heading #{fragment})")
    assert not broken, "\n".join(broken)


def test_the_anchor_rule_is_githubs():
    assert anchor("Using the trained model: `tinylm generate`") == "using-the-trained-model-tinylm-generate"
    assert anchor("Recipes: GPT-2, and the modern changes one flag each") == \
        "recipes-gpt-2-and-the-modern-changes-one-flag-each"


def test_every_shown_tinylm_command_parses(repo_root, capsys):
    from tinylm.cli.main import COMMANDS, build_parser

    commands = [(where, argv[1:]) for where, argv in shown_commands(repo_root) if argv[0] == "tinylm"]
    assert len(commands) >= 10
    for where, argv in commands:
        assert argv[0] in COMMANDS, f"{where}: no subcommand {argv[0]!r}"
        try:
            build_parser(argv[0]).parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{where}: {capsys.readouterr().err.strip() or exc}")


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys |= leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def test_every_shown_dvc_command_parses_and_names_real_stages_and_params(repo_root):
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    stages = set(yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"])
    params = leaf_keys(yaml.safe_load((repo_root / "params.yaml").read_text()))
    groups = {p.name for p in (repo_root / "conf").iterdir() if p.is_dir()}
    commands = [(where, argv[1:]) for where, argv in shown_commands(repo_root) if argv[0] == "dvc"]
    assert len(commands) >= 8
    parser = get_main_parser()
    for where, argv in commands:
        try:
            args = parser.parse_args(argv)
        except DvcParserError:
            pytest.fail(f"{where}: dvc does not take these arguments")
        unknown_stages = set(getattr(args, "targets", None) or []) - stages
        assert not unknown_stages, f"{where}: no stage {sorted(unknown_stages)} in dvc.yaml"
        for override in getattr(args, "set_param", None) or []:
            key = override.split("=")[0]
            assert key in params or key in groups, f"{where}: -S {key}: neither a param nor a conf/ group"


def test_the_checks_see_a_stale_command(repo_root, tmp_path):
    # The same checks on a page with a renamed flag and a removed param must fail.
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("```console\n$ tinylm generate --no-such-flag x\n"
                                        "$ dvc exp run -S train.min_lr=1e-4\n```\n[gone](docs/gone.md)\n")
    from tinylm.cli.main import build_parser

    (_, tinylm_argv), (_, dvc_argv) = shown_commands(tmp_path)
    with pytest.raises(SystemExit):
        build_parser("generate").parse_args(tinylm_argv[1:])
    assert dvc_argv[-1].split("=")[0] not in leaf_keys(yaml.safe_load((repo_root / "params.yaml").read_text()))
    assert links(tmp_path / "README.md") == ["docs/gone.md"] and not (tmp_path / "docs/gone.md").exists()
