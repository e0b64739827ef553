"""The one exception base for problems a user can fix (a bad path, file, flag or value), for data_prep and
medgan alike (medgan imports it; data_prep imports nothing from medgan), and its kinds both share: a bad
config value (`ConfigError`, raised by medgan's configs) and a bad shard folder (`DataError`, raised by
`data_prep.shard_reader` and by medgan).

The command lines catch this class alone, print its message as a single line and exit non-zero; they never
show a traceback for it. Internal errors (bugs) are deliberately *not* this type, so they still surface with
a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input; the message names the file or value and what is wrong."""


class VolumeError(UserError):
    """A volume that cannot be used; the message names the file (or modality) and what is wrong."""


class ConfigError(UserError, ValueError):
    """A config key or value a user wrote is wrong (one line naming it): the one class for medgan's config
    tree and its model configs alike (a ValueError too, as a bad argument to a config dataclass)."""


class DataError(UserError):
    """A shard folder a user pointed at is missing, incomplete or inconsistent (one line, names it)."""


def exit_status(command: str, run: Callable[[], int]) -> int:
    """``run()``'s exit status; a UserError becomes one line ``COMMAND: error: ...`` on stderr and status 2,
    Ctrl-C one line and 130. Anything else is a bug and keeps its traceback. The command lines' one guard."""
    try:
        return run()
    except UserError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
