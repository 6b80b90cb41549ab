"""The one exception type for bad input: the CLI prints it as a single line and exits 1."""


class PipelineError(Exception):
    """A user-facing error; its message names the bad value and the valid choices."""
