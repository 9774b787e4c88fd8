"""Exceptions of the scene logic: `message` says what happened, `hint` says what the user can do.

The widget shows `message` in a dialog and `hint` (plus `details`, e.g. the server's reply) below it.
"""
from __future__ import annotations


class MedPrunerSlicerError(Exception):
    """Base class. `details` is optional extra text for the dialog's "details" area."""

    def __init__(self, message: str, hint: str = "", details: str = "") -> None:
        super().__init__(message if not hint else f"{message}\n{hint}")
        self.message = message
        self.hint = hint
        self.details = details


class VolumeExportError(MedPrunerSlicerError):
    """The selected volume cannot be sent (4D, vector, empty, constant, NaN, too large...)."""


class SettingsError(MedPrunerSlicerError):
    """A server address or option that cannot be used as given."""


class ServerError(MedPrunerSlicerError):
    """Any failure talking to the server. `status` is the HTTP status (None: no HTTP reply)."""

    def __init__(self, message: str, hint: str = "", details: str = "", status: int | None = None,
                 code: str = "") -> None:
        super().__init__(message, hint, details)
        self.status = status
        self.code = code


class ServerUnreachable(ServerError):
    """Connection refused, DNS failure, timeout: no HTTP reply at all."""


class AuthenticationError(ServerError):
    """401/403: the token is missing or wrong."""


class RequestTooLarge(ServerError):
    """413: the volume is larger than the server accepts."""


class InvalidRequest(ServerError):
    """422/400: the server refused a field of the request; `field` names it when known."""

    def __init__(self, *args, field: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.field = field


class ServerBusy(ServerError):
    """429/503: the server's queue is full; `retry_after` seconds when the server said."""

    def __init__(self, *args, retry_after: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class JobFailed(ServerError):
    """The job ran and failed on the server (its error code, message and hint are kept)."""


class JobCancelled(ServerError):
    """The job was cancelled (by this client or on the server)."""


class ResultError(MedPrunerSlicerError):
    """The server's result cannot be turned into scene nodes (e.g. heatmap geometry mismatch)."""
