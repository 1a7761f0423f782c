"""`fpgm`: He, Liu, Wang, Hu and Yang 2019, "Filter Pruning via Geometric Median for Deep
Convolutional Neural Networks Acceleration" (CVPR 2019).

The filters nearest the layer's geometric median are the most replaceable: each filter's score
is the sum of its distances to the layer's other filters (the paper's approximation of the
distance to the median, its eq. 6), summed over the convs one filter index removes.

Written by hand, not with Torch-Pruning's `FPGMImportance`: that one measures the distances
between the filters' |w|^p, which drops the weights' signs (two filters of opposite sign come
out identical); the paper measures them between the filters themselves."""

from __future__ import annotations

import torch

from prunelab.pruning.criteria.base import Criterion, filters


class FPGMCriterion(Criterion):
    """Sum of distances to the layer's other filters (high: far from the geometric median); needs no data."""

    name = "fpgm"
    paper = "He et al. 2019, Filter Pruning via Geometric Median for Deep Convolutional Neural Networks Acceleration"
    settings = {"p": (2, "the norm of the distance between two filters (2: Euclidean, as in the paper)")}

    @torch.no_grad()
    def score(self, model, layers, outputs, coupled):
        out = {}
        for name, convs in filters(layers, coupled).items():
            total = None
            for conv in convs:
                w = conv.weight.detach().flatten(1).double()  # float64: sums of many distances
                distances = torch.cdist(w.unsqueeze(0), w.unsqueeze(0), p=float(self.p)).squeeze(0).sum(1)
                total = distances if total is None else total + distances
            out[name] = total.float().cpu()
        return out
