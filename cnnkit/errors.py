"""Errors a user can act on.

Every failure that a user can fix raises a `CnnkitError` subclass whose message says what to do.
The CLI prints it on one line and exits with `exit_code`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class CnnkitError(Exception):
    """Base class of the errors the CLI reports in one line."""

    exit_code = 2


class DataError(CnnkitError):
    """A data folder, archive or image that cannot be used as asked."""


class ImageError(DataError):
    """One image that cannot be used; the message is the one-line reason."""


# `cnnkit infer`: the run finished but some input files could not be used (they are listed), or
# `--strict` stopped it at the first such file.
EXIT_FILES_FAILED = 4


class FileFailedError(DataError):
    """An input file that could not be used, with `--strict`: the run stops at it."""

    exit_code = EXIT_FILES_FAILED


class ModelError(CnnkitError):
    """A checkpoint or model file that is missing, malformed or not cnnkit's."""


class DeviceError(CnnkitError):
    """A device or execution provider that was asked for but is not available."""


class ParityError(CnnkitError):
    """An exported artifact that does not answer like the eager model. `diff`: the layer-by-layer
    comparison (`cnnkit.export.diff.DiffResult.to_dict()`) when the export gate ran one, else None."""

    exit_code = 3
    diff: dict | None = None


class DownloadError(CnnkitError):
    """A download that failed or did not verify."""
