"""Filter importance criteria, plug-ins over one ranking loop.

Each criterion is one class in one module of this package (`base.Criterion`: a name, its
paper, its own settings, and scores per layer; data-driven ones fed by `ranking.py`, the one
loop over the ranking images); `CRITERIA` registers it with one line:

| name | module | paper | needs |
|---|---|---|---|
| `taylor` | `taylor.py` | Molchanov et al. 2017 | ranking images |
| `l1`, `l2` | `magnitude.py` | Li et al. 2017 | weights |
| `fpgm` | `fpgm.py` | He et al. 2019 | weights |
| `bn_scale` | `bn_scale.py` | Liu et al. 2017 | a BatchNorm after each pruned conv |
| `hessian` | `hessian.py` | LeCun et al. 1990 (OBD) | ranking images, one backward pass per image |
| `random` | `random_scores.py` | the control | a seed |
"""

from __future__ import annotations

from prunelab.errors import ConfigError
from prunelab.pruning.criteria.base import Criterion, l2_normalise
from prunelab.pruning.criteria.bn_scale import BNScaleCriterion
from prunelab.pruning.criteria.fpgm import FPGMCriterion
from prunelab.pruning.criteria.hessian import HessianCriterion
from prunelab.pruning.criteria.magnitude import L1Criterion, L2Criterion
from prunelab.pruning.criteria.random_scores import RandomCriterion
from prunelab.pruning.criteria.taylor import TaylorCriterion

CRITERIA: dict[str, type[Criterion]] = {
    "taylor": TaylorCriterion,
    "l1": L1Criterion,
    "l2": L2Criterion,
    "fpgm": FPGMCriterion,
    "bn_scale": BNScaleCriterion,
    "hessian": HessianCriterion,
    "random": RandomCriterion,
}


def get(name: str, seed: int = 0, **settings) -> Criterion:
    """The criterion `name`, seeded (a random one draws from `seed`) and with its own `settings`."""
    cls = CRITERIA.get(name)
    if cls is None:
        raise ConfigError(f"unknown pruning method {name!r}: choose one of {', '.join(sorted(CRITERIA))}")
    return cls(seed, **settings)


__all__ = ["CRITERIA", "Criterion", "get", "l2_normalise", "TaylorCriterion", "L1Criterion", "L2Criterion",
           "FPGMCriterion", "BNScaleCriterion", "HessianCriterion", "RandomCriterion"]
