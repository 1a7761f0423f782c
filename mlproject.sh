#!/bin/sh
# Every MLproject entry point runs `sh mlproject.sh <command> ...`, which is
# `python -m prunelab <command> ...` with a Python that has prunelab and its
# dependencies. `mlflow run` runs an entry point with the first `python` on
# PATH: the environment it built or activated, or, when `.venv/bin/mlflow run`
# is called without activating the virtual environment, some other Python
# (or none). Then the repository's own .venv (made by `make install`) is used.
here=$(dirname "$0")
for python in python "$here/.venv/bin/python"; do
    # find_spec looks the packages up without importing them (importing torch costs seconds).
    if command -v "$python" >/dev/null 2>&1 && "$python" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('prunelab', 'torch', 'mlflow')))" >/dev/null 2>&1; then
        exec "$python" -m prunelab "$@"
    fi
done
echo "prunelab: error: no Python here has prunelab installed: run \`make install\` (it makes $here/.venv) or activate the environment that has it" >&2
exit 2
