"""The one exception base for problems a user can fix (a bad path, file, flag or value), for data_prep and
medgan alike (medgan imports it; data_prep imports nothing from medgan), and its kinds both share: a bad
config value (`ConfigError`, raised by medgan's configs) and a bad shard folder (`DataError`, raised by
`data_prep.shard_reader` and by medgan).

The command lines catch this class alone, print its message as a single line and exit non-zero; they never
show a traceback for it. Internal errors (bugs) are deliberately *not* this type, so they still surface with
a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or value and what is wrong."""


class VolumeError(UserError):
    """A volume that cannot be used; the message names the file (or modality) and what is wrong."""


class ConfigError(UserError, ValueError):
    """A config key or value a user wrote is wrong (one line naming it): the one class for medgan's config
    tree and its model configs alike (a ValueError too, as a bad argument to a config dataclass)."""


class DataError(UserError):
    """A shard folder a user pointed at is missing, incomplete or inconsistent (one line, names it)."""
