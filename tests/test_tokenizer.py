"""CLIP tokenizer fidelity (golden ids from openai/CLIP) and the ``text:weight`` prompt syntax."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ccld_trt.export.errors import UserError
from ccld_trt.image_prompt import parse_prompt
from ccld_trt.tokenizer import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN, tokenize

PROMPTS = json.loads((Path(__file__).resolve().parent / "fixtures" / "prompts.json").read_text())


def ids(text: str) -> list[int]:
    row = tokenize([text])[0].tolist()
    return row[: row.index(EOT_TOKEN, 1) + 1] if EOT_TOKEN in row[1:] else row


def test_tokens_equal_golden(golden: dict[str, np.ndarray]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these prompts is too long
        tokens = tokenize(PROMPTS["prompts"])
    assert tokens.dtype == torch.int64
    assert tokens.shape == (len(PROMPTS["prompts"]), CONTEXT_LENGTH)
    np.testing.assert_array_equal(tokens.numpy(), golden["text_tokens"])


def test_long_prompt_is_truncated_with_warning(golden: dict[str, np.ndarray]) -> None:
    with pytest.warns(UserWarning, match="truncated"):
        tokens = tokenize([PROMPTS["long_prompt"]])
    np.testing.assert_array_equal(tokens.numpy(), golden["long_tokens"])
    assert tokens[0, 0] == SOT_TOKEN and tokens[0, -1] == EOT_TOKEN


def test_single_string_is_one_prompt() -> None:
    assert torch.equal(tokenize("x"), tokenize(["x"]))
    assert tokenize([]).shape == (0, CONTEXT_LENGTH)


def test_text_is_cleaned_like_clip() -> None:
    # ftfy + HTML unescaped twice + whitespace collapsed + lowercased.
    assert ids("  Hello,\u3000WORLD\n ") == ids("hello, world") == [SOT_TOKEN, 3306, 267, 1002, EOT_TOKEN]
    assert ids("&amp;lt;b&amp;gt;") == ids("<b>") == [SOT_TOKEN, 283, 321, 285, EOT_TOKEN]
    assert ids("") == [SOT_TOKEN, EOT_TOKEN]


def test_special_token_literals_like_clip() -> None:
    # Ids from openai/CLIP's SimpleTokenizer: the literal becomes EOT only where CLIP's regex starts a token.
    assert ids("a photo<|endoftext|>of a cat") == [SOT_TOKEN, 320, 1125, EOT_TOKEN]
    row = tokenize(["a photo<|endoftext|>of a cat"])[0].tolist()
    assert row[:8] == [SOT_TOKEN, 320, 1125, EOT_TOKEN, 539, 320, 2368, EOT_TOKEN]
    assert ids("!<|endoftext|>x") == [SOT_TOKEN, 0, 27, 347, 40786, 4160, 91, 285, 343, EOT_TOKEN]
    assert tokenize(["it's<|endoftext|>"])[0, :5].tolist() == [SOT_TOKEN, 585, 568, EOT_TOKEN, EOT_TOKEN]


def test_combining_ypogegrammeni_is_skipped_like_clip() -> None:
    # CLIP's case-insensitive regex matches U+0345 with no alternative, so it separates tokens like a space.
    assert ids("a\u0345b") == ids("a b")


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a red house", ("a red house", 3.0)),
    ("a red house:2.5", ("a red house", 2.5)),
    ("ratio 1:2:-1", ("ratio 1:2", -1.0)),
    (":1", ("", 1.0)),
    ("https://example.com/cat.png", ("https://example.com/cat.png", 3.0)),
    ("https://example.com/cat.png:0.5", ("https://example.com/cat.png", 0.5)),
    ("http://host:8080/cat.png:2", ("http://host:8080/cat.png", 2.0)),
])
def test_parse_prompt(prompt: str, expected: tuple[str, float]) -> None:
    assert parse_prompt(prompt) == expected


def test_parse_prompt_default_weight() -> None:
    assert parse_prompt("x", default_weight=1.5) == ("x", 1.5)


@pytest.mark.parametrize("prompt", ["style: oil painting", "a cat:", "http://host:8080/cat.png", "a:nan", "a:inf"])
def test_parse_prompt_rejects_bad_weight(prompt: str) -> None:
    with pytest.raises(UserError, match="prompt") as e:
        parse_prompt(prompt)
    assert repr(prompt) in str(e.value)


def test_text_fix_skips_ftfy_only_where_ftfy_changes_nothing() -> None:
    """``_fix_text`` leaves printable ASCII without "&" to itself (ftfy's import is ~0.1 s): ftfy returns such
    text unchanged, and everything else still goes through ftfy."""
    import random
    import string

    import ftfy

    from ccld_trt.tokenizer import _fix_text

    rng = random.Random(0)
    plain = [c for c in string.printable if c.isprintable() and c != "&"]
    samples = plain + ["".join(rng.choices(plain, k=rng.randint(2, 80))) for _ in range(3000)]
    samples += ["it''s a ``quoted'' <b>word</b>", "a;b;c:d -- e...", "<|endoftext|> x", "\\x1b[31m red"]
    for text in samples:
        assert ftfy.fix_text(text) == text, text
        assert _fix_text(text) is text
    others = ["a &amp; b", "&lt;b&gt;", "caf\u00c3\u00a9", "\u201csmart\u201d", "line\r\nbreak", "tab\there",
              "bell\x07", "\x1b[31mred\x1b[0m", "\ufb01ne", "\uff37ide", "\u00e9t\u00e9"]
    for text in others:
        assert _fix_text(text) == ftfy.fix_text(text)
    assert any(ftfy.fix_text(text) != text for text in others)  # the other path is taken where it matters
