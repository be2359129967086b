"""The project's own error types: each message names the file (and record) and the fix.

The CLI turns these into one clear line and exit status 2; anything else is a bug (exit 1).
"""
from __future__ import annotations

from typing import Optional

# How PyTorch's DataLoader re-raises a worker's exception in the main process: the same type,
# built from text, "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...".
_WORKER_PREFIX = "Caught "
_WORKER_MARK = "\nOriginal Traceback (most recent call last):\n"


class DetrkitError(Exception):
    """Base class of errors caused by the user's input (data, weights, flags).

    Raised in a DataLoader worker, the error reaches the main process re-created from the
    worker's formatted traceback; the message is then the worker's own message again (say, the
    image file that could not be read), and the traceback text is kept in ``worker_traceback``.
    """

    worker_traceback: Optional[str] = None

    def __init__(self, *args) -> None:
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else None
        if text and text.startswith(_WORKER_PREFIX) and _WORKER_MARK in text:
            message = _original_message(text, type(self))
            if message is not None:
                self.worker_traceback = text
                args = (message,)
        super().__init__(*args)


def _original_message(text: str, cls: type) -> Optional[str]:
    """The message after the last ``module.Class: `` line of a formatted traceback, or None."""
    head = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(head)
    return text[at + len(head):].rstrip("\n") if at >= 0 else None


class DataError(DetrkitError):
    """A data set, annotation file or image that cannot be used as it is."""


class CheckpointError(DetrkitError):
    """A weights file that is missing, truncated, foreign or unsafe."""
