"""User-facing errors.

Anything raised as a `PrunelabError` is a problem with the user's input or
environment: the CLI prints its message as one line (what was wrong, what to
do) and exits non-zero without a traceback. Every other exception is a bug and
keeps its traceback.
"""


class PrunelabError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(PrunelabError):
    """A preset, override or command-line value that is not valid."""


class DataError(PrunelabError):
    """A data set that cannot be found or read."""


class ModelError(PrunelabError):
    """A model, checkpoint or model reference that cannot be used."""


class TrackingError(PrunelabError):
    """The tracking server cannot be reached or has no such run."""
