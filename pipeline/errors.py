"""The one exception type for bad input: the CLI prints it as a single line and exits 1."""


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
