"""Exceptions the engine raises, each carrying a message (what is wrong) and a hint (what to do).

The CLI maps `InputError` to exit code 2 and the server maps it to a 4xx JSON error, so every
layer reports the same words to the user.
"""
from __future__ import annotations


class MedPrunerError(Exception):
    """Base class: `message` says what went wrong, `hint` says what the user can do about it."""

    code = "medpruner_error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message if not hint else f"{message} ({hint})")
        self.message = message
        self.hint = hint


class InputError(MedPrunerError, ValueError):
    """The user's input (slices, question, volume, option) cannot be used as given."""

    code = "bad_input"


class VolumeError(InputError):
    """A volume file that cannot be read or is not a usable 3D scalar image."""

    code = "bad_volume"


class UnknownVolume(InputError):
    """A follow-up names a prepared volume this process no longer holds (evicted, expired, restarted)."""

    code = "unknown_volume"


class SettingsMismatch(InputError):
    """A follow-up's slicing or pruning settings differ from those its prepared volume was made with."""

    code = "settings_mismatch"


class ModelLoadError(MedPrunerError, ValueError):
    """A checkpoint that cannot be found, read, or is of an unsupported model family."""

    code = "bad_model"


class Cancelled(MedPrunerError):
    """The caller asked to stop; raised at the next stage boundary or generated token."""

    code = "cancelled"

    def __init__(self, message: str = "The job was cancelled.", hint: str = "") -> None:
        super().__init__(message, hint)


class VolumeTooLarge(VolumeError):
    """A volume whose header claims more voxels or bytes than the reader may spend on it."""

    code = "volume_too_large"
