"""Caption cleaning rules and caption-field checks.

Three rules, chosen with ``data.clean``:

* ``"albef"``: lower-case; drop the characters ``, . ' ! ? " ( ) * # : ; ~``; hyphens and slashes become spaces;
  ``<person>`` becomes ``person``; runs of whitespace collapse to one space.
* ``"blip"``: lower-case; the characters ``. ! " ( ) * # : ; ~`` become spaces (commas and apostrophes stay);
  runs of whitespace collapse.
* ``"none"``: only surrounding whitespace is stripped and inner runs collapse.

Every rule then keeps at most ``max_words`` space-separated words. The tokenizer's own length limit is applied
later, in the collator.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlp.data.errors import BadSample

_ALBEF_DROP = re.compile(r"[,.'!?\"()*#:;~]")
_ALBEF_SPACE = re.compile(r"[-/]")
_BLIP_SPACE = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str, rule: str = "albef", max_words: int = 30) -> str:
    """Clean one caption with ``rule`` ("albef" | "blip" | "none") and keep its first ``max_words`` words."""
    # Rule-specific character handling.
    if rule == "albef":
        text = _ALBEF_DROP.sub("", text.lower())
        text = _ALBEF_SPACE.sub(" ", text).replace("<person>", "person")
    elif rule == "blip":
        text = _BLIP_SPACE.sub(" ", text.lower())
    elif rule != "none":
        raise ValueError(f"data.clean must be one of 'albef', 'blip', 'none' (got {rule!r})")

    # Shared whitespace normalisation and word budget.
    words = _WHITESPACE.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words]) if words != [""] else ""


def caption_candidates(value: object) -> list[str]:
    """Return the usable raw captions of an annotation's caption field, or raise BadSample.

    A string is one caption; a list may hold several (one is drawn per epoch). Non-string list members and
    blank strings are dropped from a list; the entry is bad only when nothing usable remains.
    """
    # A single caption.
    if isinstance(value, str):
        if not value.strip():
            raise BadSample("empty caption", "caption is empty or whitespace")
        return [value]

    # A list of captions: keep the usable ones.
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        if len(value) == 0:
            raise BadSample("empty caption list", "caption list has no entries")
        usable = [c for c in value if isinstance(c, str) and c.strip()]
        if not usable:
            raise BadSample("empty caption list", "no caption in the list is a non-empty string")
        return usable
    raise BadSample("caption not a string", f"caption has type {type(value).__name__}")
