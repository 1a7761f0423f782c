"""The MLflow tracking server prunelab talks to: the client's check that one answers
(`probe`), and starting and stopping one (`launch`, `python -m prunelab.server`) with
its store in SQLite or in a PostgreSQL cluster of its own (`postgresql`).

Only `probe` (the standard library alone) is loaded here, so that a tracking client
never loads the launcher or the PostgreSQL set-up.
"""

from __future__ import annotations

import types

from prunelab.server import probe as _probe_module


# Transitional, for callers written before `server` became a package: they call
# `server.probe(uri, timeout)`, which now names the `probe` module, so calling that module
# calls its `probe` function. Delete this once every caller says `probe.probe(...)`.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.probe(*args, **kwargs)


_probe_module.__class__ = _CallableModule
