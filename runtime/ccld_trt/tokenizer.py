"""CLIP text tokenizer with the exact semantics of openai/CLIP's ``clip.tokenize``.

The BPE itself comes from ``instant-clip-tokenizer`` (which bundles the CLIP vocabulary). That package only
lowercases, so the text clean-up that CLIP's ``SimpleTokenizer.encode`` does first (ftfy, double HTML
unescape, whitespace collapsing) is done here, as is CLIP's handling of the literal special-token strings.
Unlike ``clip.tokenize``, prompts longer than the context are truncated (end-of-text kept last) with a warning
instead of raising, and the work is bounded by what the context can use: at most MAX_PROMPT_CHARS characters
are cleaned, and BPE reads only the first USEFUL_CHARS characters of the cleaned text (a 100,000-character
prompt no longer costs seconds).

Known difference: CLIP's case-insensitive regex reads an apostrophe followed by U+017F (long s) as the
contraction "'s"; here the two are separate tokens. Characters that Python's Unicode tables leave unassigned
may also split differently (the original depends on the installed ``regex`` release for those).
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import instant_clip_tokenizer
import numpy as np

from ccld_trt.export.graph_specs import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN
from ccld_trt.limits import MAX_PROMPT_CHARS

if TYPE_CHECKING:
    import torch

# CLIP collapses whitespace with the `regex` module. The stdlib's \s differs from it only on U+001C..U+001F,
# control characters that ftfy has removed by then.
_WHITESPACE_RUN = re.compile(r"\s+")
_SPECIAL_LITERAL = re.compile(r"<\|startoftext\|>|<\|endoftext\|>")
_SPECIAL_IDS = {"<|startoftext|>": SOT_TOKEN, "<|endoftext|>": EOT_TOKEN}
_SPACE_RUN = re.compile(" {2,}")
# The longest token of CLIP's vocabulary spells 24 characters (a test reads the vocabulary).
MAX_TOKEN_CHARS = 24
# Cleaned text past this cannot reach a 77-token row: its 75 content tokens span at most 75 x (24 + 1 space)
# = 1,875 characters. Twice that keeps whole the word that holds the 75th token (the cut is at a space past
# the first half when there is one), so the first 75 tokens are those of the whole text.
USEFUL_CHARS = 2 * (CONTEXT_LENGTH - 2) * (MAX_TOKEN_CHARS + 1)


@functools.cache
def _bpe() -> instant_clip_tokenizer.Tokenizer:
    # Building the tokenizer parses the whole vocabulary: do it once per process.
    return instant_clip_tokenizer.Tokenizer()


def clean_text(text: str) -> str:
    """CLIP's normalisation before BPE: ftfy, HTML unescape twice, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def _fix_text(text: str) -> str:
    """``ftfy.fix_text(text)``, without importing ftfy for printable ASCII that holds no "&": every one of its
    fixes needs a character outside that set (non-ASCII mojibake, quotes, widths and ligatures; control
    characters and terminal escapes; line breaks; HTML entities), so it returns such text unchanged, and its
    import (~0.1 s: wcwidth's tables) is most of a short prompt's cost."""
    if text.isascii() and text.isprintable() and "&" not in text:
        return text
    import ftfy

    return ftfy.fix_text(text)


def _starts_token(text: str, pos: int, prev_special_end: int) -> bool:
    """Whether CLIP's pre-tokenizing regex begins a new match at ``pos``.

    Its alternatives, in order, are the two special literals, contractions (ending in a letter), letter runs,
    single digits and runs of other non-space characters. The scan therefore reaches ``pos`` unless the
    character before it belongs to a run of "other" characters, which would swallow the ``<`` at ``pos``.
    """
    if pos == 0 or pos == prev_special_end:
        return True
    prev = text[pos - 1]
    return prev == " " or unicodedata.category(prev)[0] in "LN"


def _bpe_text(text: str) -> str:
    """``clean_text``, then what CLIP's pre-tokenizer skips made single spaces."""
    # CLIP's pre-tokenizer is case-insensitive, which makes it skip U+0345 (it case-folds to a letter, so the
    # negated "other characters" class rejects it) exactly like a space. Runs of spaces split words as one
    # space does; collapsing them keeps USEFUL_CHARS a bound on the characters that 75 tokens span.
    return _SPACE_RUN.sub(" ", clean_text(text).replace("\u0345", " "))


def useful_prefix(text: str) -> str:
    """Cleaned text (``_bpe_text``) cut to the part whose tokens can reach the context (USEFUL_CHARS)."""
    if len(text) <= USEFUL_CHARS:
        return text
    cut = text.rfind(" ", USEFUL_CHARS // 2, USEFUL_CHARS)
    return text[:cut if cut > 0 else USEFUL_CHARS]


def encode(text: str, *, bounded: bool = False) -> list[int]:
    """BPE ids of one prompt, without SOT/EOT, exactly as CLIP's ``SimpleTokenizer.encode``.

    The literal strings ``<|startoftext|>`` / ``<|endoftext|>`` become the special ids where CLIP's regex
    would match them (instant-clip-tokenizer alone would spell them out as punctuation and words).
    ``bounded``: only the ids that can reach a 77-token row (at least its first 75 are exact): the first
    MAX_PROMPT_CHARS characters are cleaned and BPE reads the ``useful_prefix`` of those.
    """
    text = useful_prefix(_bpe_text(text[:MAX_PROMPT_CHARS])) if bounded else _bpe_text(text)
    ids: list[int] = []
    start = 0
    prev_special_end = -1
    for match in _SPECIAL_LITERAL.finditer(text):
        if not _starts_token(text, match.start(), prev_special_end):
            continue
        ids += _bpe().encode(text[start:match.start()])
        ids.append(_SPECIAL_IDS[match.group()])
        start = prev_special_end = match.end()
    ids += _bpe().encode(text[start:])
    return ids


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """``token_ids`` as a torch tensor: int64 [N, context_length]."""
    import torch

    return torch.from_numpy(token_ids(texts, context_length))


def token_ids(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Token ids for a batch of prompts, as ``clip.tokenize`` gives them (numpy: the graph backends need no torch).

    Args:
        texts: prompts (a single string counts as one prompt).
        context_length: row length; 77 for every CLIP/CLOOB text encoder.

    Returns:
        int64 array [N, context_length]: SOT, BPE ids, EOT, then zero padding. A prompt that does not fit
        is cut to ``context_length`` ids with EOT as the last one, and a warning names it.
    """
    if isinstance(texts, str):
        texts = [texts]
    out = np.zeros([len(texts), context_length], dtype=np.int64)
    for row, text in enumerate(texts):
        # bounded: a longer row than context_length cannot use what the bound leaves out
        ids = [SOT_TOKEN, *encode(text, bounded=context_length <= CONTEXT_LENGTH), EOT_TOKEN]
        if len(ids) > context_length:
            shown = text if len(text) <= 60 else text[:57] + "..."
            warnings.warn(
                f"prompt {shown!r} is longer than the text encoder's {context_length}-token context; truncated",
                stacklevel=3,
            )
            ids = [*ids[: context_length - 1], EOT_TOKEN]
        out[row, : len(ids)] = ids
    return out
