"""The clean stage: mojibake repair, normalisation, every drop reason, determinism."""
from __future__ import annotations

import copy
import re

import ftfy
import pytest
import yaml

from tinylm.corpus import clean
from tinylm.corpus import formats
from tinylm.corpus.clean import SplitReport, clean_split, clean_story, drop_reason
from tinylm.config import parse_params

STORY = ("Once upon a time, a cat sat on a mat. It was happy and it purred all day long. "
         "Its friend the dog came to play, and they ran in the sun. The end came soon.")
EOT = ["<|endoftext|>"]


@pytest.fixture
def params(repo_root):
    def make(**changes):
        raw = yaml.safe_load((repo_root / "params.yaml").read_text())
        raw["clean"] = {**copy.deepcopy(raw["clean"]), **changes}
        return parse_params(raw).clean
    return make


def run(stories, params, exclude=None):
    report = SplitReport()
    return list(clean_split(stories, params, EOT, report, exclude)), report


@pytest.mark.parametrize("broken, fixed", [
    ("It\u00e2\u20ac\u2122s mine.", "It’s mine."),
    ("He said, \u00e2\u20ac\u0153Hi!\u00e2\u20ac\u009d", "He said, “Hi!”"),
    # the closing quote whose 0x9D byte cp1252 lost: a bare â€ at the end of a quote
    ("He said, \u00e2\u20ac\u0153Hi!\u00e2\u20ac\nNext", "He said, “Hi!”\nNext"),
    ("her\u00e2\u20ac\u201dshe", "her—she"),
])
def test_mojibake_is_repaired_and_counted(broken, fixed, params):
    text, repaired = clean_story(broken, params())
    assert text == fixed and repaired


def test_clean_text_is_not_marked_repaired(params):
    text, repaired = clean_story("“Curly” quotes – and dashes.", params())
    assert text == "“Curly” quotes – and dashes." and not repaired


def test_whitespace_and_nfc(params):
    text, _ = clean_story("  Cafe\u0301  and\ttea.  \r\n\r\n\r\n\r\nNext\u00a0line.  \n", params())
    assert text == "Café and tea.\n\nNext line."


def test_ascii_punctuation_option(params):
    text, _ = clean_story("“Don’t” – she said…", params(ascii_punctuation=True))
    assert text == "\"Don't\" - she said..."


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    (STORY + " <|endoftext|> " + STORY, "special_token"),
    ("\u2588\u2593\u2592" * 40 + STORY, "nontext"),
    ("Too short.", "too_short"),
    (STORY * 200, "too_long"),
    (STORY + " And then the", "truncated"),
])
def test_each_drop_reason(text, reason, params):
    assert drop_reason(clean_story(text, params())[0], params(), EOT) == reason


@pytest.mark.parametrize("ending", ["The End", '"Yes!"', "happy.”", "(really!)", "«Bye.»"])
def test_story_endings_are_not_truncation(ending, params):
    assert drop_reason(f"{STORY}\n{ending}", params(), EOT) is None


def test_duplicates_and_val_overlap_are_dropped_and_counted(params):
    other = STORY.replace("cat", "dog")
    kept, report = run([STORY, other, STORY + "  ", other], params(), exclude={clean.digest(other)})
    assert kept == [STORY]
    assert report.dropped["duplicate"] == 2 and report.dropped["val_overlap"] == 1
    assert report.stories_in == 4 and report.stories_out == 1


def test_ten_megabyte_story_is_dropped_quickly(params):
    kept, report = run(["word " * 2_000_000], params())
    assert kept == [] and report.dropped["too_long"] == 1


def test_report_has_every_reason(params):
    _, report = run([STORY, ""], params())
    assert set(report.record().dropped) == set(clean.DROP_REASONS)


def test_messy_v1_file_leaves_no_mojibake(shared_dir, params, repo_root):
    messy = shared_dir / "data/tinystories/messy/TinyStories-valid-v1-mojibake.txt"
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    opener = re.compile(raw["data"]["story_start_regex"])
    stories = list(formats.iter_file_stories(messy, opener))
    kept, report = run(stories, params())
    assert report.mojibake_repaired >= 20
    assert report.dropped["truncated"] >= 1  # the file's last story is cut off
    assert not [s for s in kept if "â€" in s or "Ã" in s or ftfy.is_bad(s)]
    assert any("”" in s for s in kept)


def test_output_is_deterministic(shared_dir, params, tmp_path):
    stories = list(formats.iter_eot_stories(shared_dir / "data/tinystories/TinyStories-valid-sample.txt"))[:300]
    for name in ("a.txt", "b.txt"):
        formats.write_eot_stories(tmp_path / name, run(stories, params())[0])
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()
    assert list(formats.iter_eot_stories(tmp_path / "a.txt")) == run(stories, params())[0]
