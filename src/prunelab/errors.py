"""User-facing errors.

Anything raised as a `PrunelabError` is a problem with the user's input or
environment: the CLI prints its message as one line (what was wrong, what to
do) and exits non-zero without a traceback. Every other exception is a bug and
keeps its traceback.
"""

import re
import warnings


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


MAX_MESSAGE = 1000  # characters of one error line: a message quoting a huge input still fits a terminal
_CONTROL = {c: " " for c in range(32)} | {127: " "}  # newlines, tabs, escapes: nothing that breaks the line
_TERMINAL_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours and cursor moves


def first_line(exc: BaseException) -> str:
    """What `exc` says, in one line of at most 200 characters (its type when it says nothing)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one line of at most `limit` characters: terminal colour codes go (some
    libraries' messages carry them), other control characters become spaces, and a
    longer text ends in '…'."""
    text = _TERMINAL_CODE.sub("", text).strip().translate(_CONTROL)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def shown(value: object, limit: int = 80) -> str:
    """How an error quotes a value the user gave: its repr, at most `limit` characters
    (a 4 KB value or a control character must not become the message)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "…" + text[-3:]


class HeldWarnings:
    """Python warnings (a library's: torch, PIL, ...) raised while a command's input is
    still being checked, held back: a refused input then ends with its one line alone
    (`drop`), since a warning about the very file it refuses says nothing more, while an
    accepted input prints them as soon as its first run starts (`input_accepted`), and
    any other ending (success, a bug, a signal) prints them on the way out. From then on
    warnings print as they happen: nothing is hidden from a command that runs."""

    def __init__(self):
        self._held: list[tuple] = []
        self._holding = False
        self._previous = None

    def __enter__(self) -> "HeldWarnings":
        self._previous, warnings.showwarning = warnings.showwarning, self._show
        self._holding = True
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        _active.remove(self)
        warnings.showwarning = self._previous

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self._holding:
            self._held.append((message, category, filename, lineno, file, line))
        else:
            self._previous(message, category, filename, lineno, file, line)

    def release(self) -> None:
        """Print what was held; later warnings print as they happen."""
        self._holding = False
        held, self._held = self._held, []
        for warning in held:
            self._previous(*warning)

    def drop(self) -> None:
        """Forget what was held (the input was refused: its one line says what matters)."""
        self._held = []


_active: list[HeldWarnings] = []


def input_accepted() -> None:
    """The command's input passed every check and its work started (a run is open):
    warnings held until now are printed, and later ones as they happen."""
    for held in _active:
        held.release()
