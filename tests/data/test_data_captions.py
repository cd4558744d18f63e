"""Caption cleaning rules and caption-field checks."""

from __future__ import annotations

import pytest

from vlp.data.captions import caption_candidates, clean_caption
from vlp.data.errors import BadSample

RAW = '  A man\'s "red" ball, (left)-side/top: #1!  <person> runs;  fast~ ? '


def test_albef_rule_drops_punctuation_and_splits_hyphens():
    assert clean_caption(RAW, "albef", 30) == "a mans red ball left side top 1 person runs fast"


def test_albef_rule_replaces_hyphen_and_slash_with_space():
    assert clean_caption("black-and-white dog/cat", "albef", 30) == "black and white dog cat"


def test_blip_rule_keeps_commas_and_apostrophes():
    assert clean_caption(RAW, "blip", 30) == "a man's red ball, left -side/top 1 <person> runs fast ?"


def test_none_rule_only_normalises_whitespace():
    assert clean_caption("  Two  Dogs.\n", "none", 30) == "Two Dogs."


@pytest.mark.parametrize("rule", ["albef", "blip", "none"])
def test_max_words_truncates(rule):
    assert clean_caption("one two three four five", rule, 3) == "one two three"


@pytest.mark.parametrize("rule", ["albef", "blip"])
def test_punctuation_only_caption_cleans_to_empty(rule):
    assert clean_caption(" ... !! ", rule, 30) == ""


def test_unknown_rule_names_the_key():
    with pytest.raises(ValueError, match=r"data\.clean"):
        clean_caption("x", "fancy", 30)


def test_caption_candidates_accepts_strings_and_lists():
    assert caption_candidates("a dog") == ["a dog"]
    assert caption_candidates(["a dog", 3, "  ", "a cat"]) == ["a dog", "a cat"]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("   ", "empty caption"),
        ("", "empty caption"),
        ([], "empty caption list"),
        ([None, ""], "empty caption list"),
        (42, "caption not a string"),
        (None, "caption not a string"),
        ({"text": "a dog"}, "caption not a string"),
    ],
)
def test_caption_candidates_rejects_bad_fields(value, kind):
    with pytest.raises(BadSample) as info:
        caption_candidates(value)
    assert info.value.kind == kind
