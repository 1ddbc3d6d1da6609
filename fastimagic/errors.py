"""The errors a person sees. Each message is one line: what is wrong, where, and what is allowed."""

from __future__ import annotations


class FastImagicError(Exception):
    """Base class: a failure the tool explains in one line (CLI exit code 1)."""


class InputError(FastImagicError, ValueError):
    """Bad input from the user: a file, a field, a value (CLI exit code 2)."""


class FinetuneError(FastImagicError):
    """Fine-tuning could not go on (for example the loss became NaN)."""
