"""The project's own error types: each message names the file (and record) and the fix.

The CLI turns these into one clear line and exit status 2; anything else is a bug (exit 1).
"""


class DetrkitError(Exception):
    """Base class of errors caused by the user's input (data, weights, flags)."""


class DataError(DetrkitError):
    """A data set, annotation file or image that cannot be used as it is."""


class CheckpointError(DetrkitError):
    """A weights file that is missing, truncated, foreign or unsafe."""
