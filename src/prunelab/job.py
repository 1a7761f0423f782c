"""`python -m prunelab.job <command> ...`: a step as a Kubernetes Job runs it.

MLflow's Kubernetes backend puts a step's command into the Job as the container's
exec arguments, each still shell-quoted (`'train.epochs=1 trials=2'`, `''` for an
empty parameter), and no shell runs in between to remove the quotes. This undoes
that quoting, one argument at a time, then runs `prunelab <command> ...`.
"""

from __future__ import annotations

import shlex
import sys

from prunelab.cli import main


def unquote(args: list[str]) -> list[str]:
    """Each argument as the shell would have read it: MLflow quoted every one separately."""
    return [shlex.split(arg)[0] if arg.strip() else arg for arg in args]


if __name__ == "__main__":
    sys.exit(main(unquote(sys.argv[1:])))
