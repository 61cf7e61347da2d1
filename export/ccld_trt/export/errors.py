"""The one exception type that the CLI turns into a one-line message (no traceback unless --debug)."""


class UserError(Exception):
    """A problem the user can fix: a bad argument, a missing or broken file. The message names it."""
