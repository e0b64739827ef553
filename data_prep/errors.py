"""The one exception base for problems a user can fix (a bad path, file, flag or value), for data_prep and
medgan alike (medgan imports it; data_prep imports nothing from medgan).

The command lines catch this class alone, print its message as a single line and exit non-zero; they never
show a traceback for it. Internal errors (bugs) are deliberately *not* this type, so they still surface with
a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or value and what is wrong."""


class VolumeError(UserError):
    """A volume that cannot be used; the message names the file (or modality) and what is wrong."""
