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


class NothingToDraw(TrackingError):
    """A report that finds no finished runs of its study, at its settings, on the server.
    It names the command that makes them: `command` (the study as it was asked for, given
    by whoever knows that) followed by `needs`, placeholders for inputs that command lacks
    (`--data-dir DIR`)."""

    def __init__(self, study: str, server: str, what: str, needs: tuple[str, ...] = (), command: str = ""):
        self.study, self.server, self.what, self.needs = study, server, what, needs
        self.command = " ".join([command or f"prunelab run --study {study}", *needs])
        super().__init__(f"experiment {study!r} on {server} has no finished {what} at these settings: "
                         f"run the study first (`{self.command}`)")

    def run_with(self, command: str) -> "NothingToDraw":
        """The same error, naming `command` as the one that makes the runs."""
        return NothingToDraw(self.study, self.server, self.what, self.needs, command)


class ServerError(PrunelabError):
    """A server that cannot be started as asked (one line: what, and what to do)."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP, raised where the process was (like KeyboardInterrupt for
    Ctrl-C) so that every run in progress ends FAILED on the way out. Not an
    Exception: code that handles errors must not swallow it."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


def first_line(exc: BaseException) -> str:
    """What `exc` says, in one line of at most 200 characters (its type when it says nothing)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
