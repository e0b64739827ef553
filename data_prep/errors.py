"""The one exception type for problems a user can fix (a bad path, file, flag or value).

The command line prints its message as a single line and exits non-zero; it never shows a traceback for
it. Internal errors (bugs) are deliberately *not* this type, so they still surface with a traceback.
"""


class InputError(Exception):
    """A problem with the user's input; the message names the file or value and what is wrong."""


class VolumeError(InputError):
    """A volume that cannot be used; the message names the file (or modality) and what is wrong."""
