"""The one exception type for bad input: the CLI prints it as a single line and exits 1."""

import reprlib


class PipelineError(Exception):
    """A user-facing error; its message names the bad value and the valid choices."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message (its type name if it has none), so a
    library's multi-line error can be quoted inside a one-line PipelineError."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if not line:
        return type(exc).__name__
    return f"{type(exc).__name__}: {line}" if with_type else line


PATH_MAX = 4096  # Linux's limit: a longer text is never a path, so it needn't be shown whole


def quote(value: object, limit: int = 100) -> str:
    """`repr(value)` for an error message, at most about `limit` characters.

    Errors quote what the user wrote, and a YAML file of nested aliases (a "billion laughs")
    is a few hundred bytes whose repr is gigabytes: `reprlib` stops at a few items per level
    and two levels deep, so the cost is bounded by what is shown, not by the value.
    """
    shorten = reprlib.Repr()
    shorten.maxlevel = 2
    shorten.maxlist = shorten.maxtuple = shorten.maxdict = shorten.maxset = 4
    shorten.maxstring = shorten.maxother = shorten.maxlong = limit // 2
    try:
        text = shorten.repr(value)
    except ValueError:  # an int over Python's 4300-digit str() limit
        return f"<an integer of {value.bit_length()} bits>"  # type: ignore[union-attr]
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
