"""A report's table as metrics: each number named by its row and column, rows told apart."""

from __future__ import annotations

import pandas as pd

from prunelab.reporting import table_metrics


def test_rows_named_by_their_first_column():
    table = pd.DataFrame({"model": ["original", "pruned + fine-tuned"], "trials": [5, 5], "params": [126698.0, 71161.0],
                          "note": ["a", "b"]})
    assert table_metrics(table) == {"original.trials": 5.0, "original.params": 126698.0,
                                    "pruned_fine-tuned.trials": 5.0, "pruned_fine-tuned.params": 71161.0}


def test_rows_that_share_a_first_column_take_the_next_one_too():
    table = pd.DataFrame({"variant": ["winning ticket", "winning ticket", "random reinit"], "pm_percent": [100.0, 80.0, 80.0],
                          "accuracy_mean": [0.5, 0.6, float("nan")]})
    assert table_metrics(table) == {"winning_ticket.pm_percent_100.accuracy_mean": 0.5,
                                    "winning_ticket.pm_percent_80.accuracy_mean": 0.6}  # NaN is no number to log


def test_a_numeric_first_column_names_itself():
    assert table_metrics(pd.DataFrame({"keep": [0.5, 0.25], "params": [10, 5]})) == {"keep_0.5.params": 10.0,
                                                                                    "keep_0.25.params": 5.0}
    assert table_metrics(pd.DataFrame()) == {}
