"""`fpgm`: He, Liu, Wang, Hu and Yang 2019, "Filter Pruning via Geometric Median for Deep
Convolutional Neural Networks Acceleration" (CVPR 2019).

The filters nearest the layer's geometric median are the most replaceable: each filter's score
is the sum of its Euclidean distances to the layer's other filters (the paper's approximation of
the distance to the median), as Torch-Pruning's `FPGMImportance` computes it: between the
filters' |w|^p (p = 2 by default), summed over the convs one filter index removes."""

from __future__ import annotations

import torch_pruning as tp

from prunelab.pruning.criteria.base import Criterion, filters, tp_group


class FPGMCriterion(Criterion):
    """Sum of distances to the layer's other filters (high: far from the geometric median); needs no data."""

    name = "fpgm"
    paper = "He et al. 2019, Filter Pruning via Geometric Median for Deep Convolutional Neural Networks Acceleration"
    settings = {"p": (2, "the power of |w| the distances are taken between (Torch-Pruning's FPGMImportance)")}

    def score(self, model, layers, outputs, coupled):
        importance = tp.importance.FPGMImportance(p=self.p, group_reduction="sum", normalizer=None)
        return {name: importance(tp_group(convs)).cpu() for name, convs in filters(layers, coupled).items()}
