"""The one exception type that the CLI turns into a one-line message (no traceback unless --debug), and the
one way a library's exception becomes part of such a line."""

import re
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class UserError(Exception):
    """A problem the user can fix: a bad argument, a missing or broken file. The message names it."""


def first_line(error: BaseException) -> str:
    """An exception's message as one clean line: no ANSI colour codes, no multi-line advice."""
    text = _ANSI.sub("", str(error)).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def require_file(path: Path, what: str) -> Path:
    """The path if it is a readable file, else a UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    return path
