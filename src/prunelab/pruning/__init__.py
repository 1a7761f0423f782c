"""Pruning: which filters matter (criteria), how many go and when (schedule),
and taking them out of the network (surgery). No module here imports mlflow."""
