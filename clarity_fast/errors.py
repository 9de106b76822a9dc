"""The one exception for mistakes in what a user gave (an argument, a file, a config value).

``InputError`` is a ``ValueError``, so library callers can catch either; the command line reports it
as one line (exit 2) and lets every other exception, internal bugs included, keep its traceback.
"""


class InputError(ValueError):
    """A mistake in an argument, file or config value; the message names it and says what was expected."""
