"""The MLflow tracking server prunelab talks to: the client's check that one answers
(`probe`), and starting and stopping one (`launch`, `python -m prunelab.server`) with
its store in SQLite or in a PostgreSQL cluster of its own (`postgresql`).

Nothing is imported here: a tracking client loads `probe` (the standard library
alone), never the launcher or the PostgreSQL set-up.
"""
