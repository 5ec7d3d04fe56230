"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class OcdError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""
