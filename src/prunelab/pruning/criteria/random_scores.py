"""`random`: random scores, the control every criterion must beat (e.g. Li et al. 2017 and
Molchanov et al. 2017 both compare against it). Seeded: a study's trial draws the same scores
each time; not normalised. By hand, not Torch-Pruning's `RandomImportance`, which draws from
the global generator and would make the draws depend on whatever ran before."""

from __future__ import annotations

import torch

from prunelab.pruning.criteria.base import Criterion


class RandomCriterion(Criterion):
    """Uniform random scores from a generator seeded with the trial's seed; needs no data."""

    name = "random"
    paper = "the control (Li et al. 2017; Molchanov et al. 2017)"
    normalise = False

    def __init__(self, seed: int = 0, **settings):
        super().__init__(seed, **settings)
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, model, layers, outputs, coupled):
        return {name: torch.rand(conv.out_channels, generator=self.generator) for name, conv in layers.items()}
