"""CLIP text tokenizer with the exact semantics of openai/CLIP's ``clip.tokenize``.

The BPE itself comes from ``instant-clip-tokenizer`` (which bundles the CLIP vocabulary). That package only
lowercases, so the text clean-up that CLIP's ``SimpleTokenizer.encode`` does first (ftfy, double HTML
unescape, whitespace collapsing) is done here, as is CLIP's handling of the literal special-token strings.
Unlike ``clip.tokenize``, prompts longer than the context are truncated (end-of-text kept last) with a warning
instead of raising.

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

import ftfy
import instant_clip_tokenizer
import torch

from ccld_trt.export.graph_specs import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN

# CLIP collapses whitespace with the `regex` module. The stdlib's \s differs from it only on U+001C..U+001F,
# control characters that ftfy has removed by then.
_WHITESPACE_RUN = re.compile(r"\s+")
_SPECIAL_LITERAL = re.compile(r"<\|startoftext\|>|<\|endoftext\|>")
_SPECIAL_IDS = {"<|startoftext|>": SOT_TOKEN, "<|endoftext|>": EOT_TOKEN}


@functools.cache
def _bpe() -> instant_clip_tokenizer.Tokenizer:
    # Building the tokenizer parses the whole vocabulary: do it once per process.
    return instant_clip_tokenizer.Tokenizer()


def clean_text(text: str) -> str:
    """CLIP's normalisation before BPE: ftfy, HTML unescape twice, collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


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


def encode(text: str) -> list[int]:
    """BPE ids of one prompt, without SOT/EOT, exactly as CLIP's ``SimpleTokenizer.encode``.

    The literal strings ``<|startoftext|>`` / ``<|endoftext|>`` become the special ids where CLIP's regex
    would match them (instant-clip-tokenizer alone would spell them out as punctuation and words).
    """
    # CLIP's pre-tokenizer is case-insensitive, which makes it skip U+0345 (it case-folds to a letter, so the
    # negated "other characters" class rejects it) exactly like a space.
    text = clean_text(text).replace("\u0345", " ")
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
    """Token ids for a batch of prompts, as ``clip.tokenize`` gives them.

    Args:
        texts: prompts (a single string counts as one prompt).
        context_length: row length; 77 for every CLIP/CLOOB text encoder.

    Returns:
        int64 tensor [N, context_length]: SOT, BPE ids, EOT, then zero padding. A prompt that does not fit
        is cut to ``context_length`` ids with EOT as the last one, and a warning names it.
    """
    if isinstance(texts, str):
        texts = [texts]
    out = torch.zeros([len(texts), context_length], dtype=torch.int64)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN, *encode(text), EOT_TOKEN]
        if len(ids) > context_length:
            shown = text if len(text) <= 60 else text[:57] + "..."
            warnings.warn(
                f"prompt {shown!r} is {len(ids)} tokens long; truncated to the text encoder's "
                f"{context_length}-token context",
                stacklevel=2,
            )
            ids = [*ids[: context_length - 1], EOT_TOKEN]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out
