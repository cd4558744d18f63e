"""Tokenizers: a Hugging Face tokenizer by name or directory, or a small built-in WordPiece vocabulary.

The built-in vocabulary needs no download: whole words for the synthetic captions and common English,
plus single characters and ``##`` continuations so that any lowercase word still tokenizes.
"""

from __future__ import annotations

import string
from functools import lru_cache

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMMON_WORDS = """a an the and or of in on at to with near next by above below left right top bottom middle
center front behind under over beside between one two three four five six seven eight nine ten some many
small big large tiny huge little medium red green blue yellow purple orange white black gray grey brown pink
cyan circle square triangle star cross diamond ring shape shapes object objects is are there it this that
picture image photo showing shows containing contains man woman men women boy girl child children dog dogs
cat people person street water grass ball playing running sitting standing walking jumping wearing shirt
his her their its red-haired young old""".split()


def builtin_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    continuations = ["##" + c for c in string.ascii_lowercase + string.digits]
    words = sorted(set(COMMON_WORDS) - set(chars))
    return SPECIAL_TOKENS + chars + continuations + words


@lru_cache(maxsize=1)
def builtin_tokenizer() -> BertTokenizerFast:
    """A lowercase WordPiece tokenizer over :func:`builtin_vocab`."""
    vocab = {token: i for i, token in enumerate(builtin_vocab())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def load_tokenizer(name: str | None) -> PreTrainedTokenizerBase:
    """``None`` or ``"builtin"``: the built-in vocabulary; otherwise a hub name or a local directory."""
    if name in (None, "builtin"):
        return builtin_tokenizer()
    return AutoTokenizer.from_pretrained(name)
