"""Errors LucidLM reports to its users.

Everything a user can get wrong (a missing file, an unsupported tensor type, a bad
sampling parameter) raises a subclass of `LucidError` with a one-line message; the
CLI prints that line and exits non-zero instead of showing a traceback.
"""


class LucidError(Exception):
    """A problem with the user's input, explained in one line."""


class ModelFileError(LucidError):
    """A model file is missing, truncated, corrupt or not in a format we read."""


class UnsupportedError(LucidError):
    """A valid file asks for something LucidLM does not implement (architecture, tensor type)."""


class InvalidArgumentError(LucidError, ValueError):
    """A parameter is outside its allowed range (temperature < 0, top_p > 1, empty prompt...)."""


class ContextOverflowError(InvalidArgumentError):
    """The prompt plus the requested new tokens do not fit in the model's context window."""
