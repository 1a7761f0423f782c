"""`l1` and `l2`: Li, Kadav, Durdanovic, Samet and Graf 2017, "Pruning Filters for Efficient
ConvNets" (ICLR 2017): a filter's weight norm; the paper ranks by L1 and reports L2 alike.

Scored by Torch-Pruning's `MagnitudeImportance` over a group of the layer's convs' output
channels alone (`base.tp_group`): summed over the convs one filter index removes, the L1
norm of all of their filters (L2: the square root of the summed squares)."""

from __future__ import annotations

import torch_pruning as tp

from prunelab.pruning.criteria.base import Criterion, filters, tp_group


class L1Criterion(Criterion):
    """L1 norm of each filter's weights, summed over the layer's coupled convs; needs no data."""

    name = "l1"
    paper = "Li et al. 2017, Pruning Filters for Efficient ConvNets"
    p = 1

    def score(self, model, layers, outputs, coupled):
        importance = tp.importance.MagnitudeImportance(p=self.p, group_reduction="sum", normalizer=None)
        return {name: self.norm(importance(tp_group(convs)).cpu()) for name, convs in filters(layers, coupled).items()}

    @staticmethod
    def norm(summed):
        return summed


class L2Criterion(L1Criterion):
    """L2 norm of each filter's weights (of all the filters one index removes); needs no data."""

    name = "l2"
    p = 2

    @staticmethod
    def norm(summed):
        return summed.sqrt()  # Torch-Pruning sums the squares; the norm is their root
