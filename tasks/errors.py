"""The two kinds of failure a step can raise, and the named errors of each.

The DAG's retry policy names the two base classes: a `PermanentError` is bad
input (a param, a dataset, a weights file, a missing upstream artifact) that
no retry can fix, so the task fails at once with a message naming the input
and the fix; a `TransientError` (a network timeout, an HTTP 5xx or throttling
answer, an object store that is down) is retried with backoff. Anything else
(out of memory, a lost worker) keeps Airflow's default: retried.
"""
from __future__ import annotations

from tasks.redact import redact_text


class RedactedError(Exception):
    """An error whose message has the credentials of every URI in it redacted: messages reach logs, XCom and the UI."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(arg) if isinstance(arg, str) else arg for arg in args))


class PermanentError(RedactedError):
    """Bad input: fix what the message names and trigger again; never retried."""


class TransientError(RedactedError):
    """A failure of something outside the pipeline that may pass: retried."""


class ConfigError(PermanentError):
    """A run parameter or trigger conf key is invalid."""


class MissingInputError(PermanentError):
    """A step's run-root input does not exist: its producer has not run for this run."""


class DatasetError(PermanentError):
    """A dataset source, archive, image folder or selection cannot be used."""


class BackboneError(PermanentError):
    """A backbone spec or its weights cannot be used."""


class UnsafePickleError(BackboneError):
    """A weights pickle asks for something other than plain tensors."""


class TrainingError(PermanentError):
    """Training cannot start from this run root or config."""


class CheckpointError(PermanentError):
    """A checkpoint cannot be restored into this model."""


class EvaluationError(PermanentError):
    """Evaluation cannot run on this run root."""


class PublishError(PermanentError):
    """Publishing or rolling back cannot go on."""


class StorageError(PermanentError):
    """An object store refuses a request for good: wrong keys, no such bucket, a key it will not take."""


class StoreUnavailableError(TransientError):
    """An object store cannot be reached or answers 5xx / throttling: retried."""


class DownloadError(TransientError):
    """A download failed on the way (timeout, connection reset, HTTP 5xx / 429): retried."""


class ImageDecodeError(PermanentError):
    """An image file cannot be decoded: not one of the accepted formats, a broken header or data, or too large."""


class ScoringError(PermanentError):
    """A batch-scoring run cannot go on: no such model or version, or an incomplete or altered one."""
