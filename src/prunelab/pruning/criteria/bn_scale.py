"""`bn_scale`: Liu, Li, Shen, Huang, Yan and Zhang 2017, "Learning Efficient Convolutional
Networks through Network Slimming" (ICCV 2017): a channel's |gamma|, the scale of the BatchNorm
after the conv.

Scored by Torch-Pruning's `BNScaleImportance` over the layer's BatchNorms (its feature maps,
`structure.Prunable.feature_maps`), summed over the ones one filter index removes. A network
whose prunable layers have no BatchNorm after them is refused in one line."""

from __future__ import annotations

import torch_pruning as tp
from torch.nn.modules.batchnorm import _BatchNorm

from prunelab.errors import ModelError
from prunelab.pruning.criteria.base import Criterion, feature_maps, tp_group


class BNScaleCriterion(Criterion):
    """|gamma| of the BatchNorm after each filter, summed over a coupled layer's BatchNorms; needs no data."""

    name = "bn_scale"
    paper = "Liu et al. 2017, Learning Efficient Convolutional Networks through Network Slimming"

    def check(self, model, layers, outputs=None, coupled=None):
        for name, maps in feature_maps(layers, outputs).items():
            if not all(isinstance(m, _BatchNorm) and m.affine for m in maps):
                raise ModelError(f"prune.method bn_scale scores the BatchNorm after each pruned conv (network slimming), "
                                 f"and layer {name} has no BatchNorm with a scale after it: choose another criterion "
                                 f"(prune.method), e.g. l1 or taylor")

    def score(self, model, layers, outputs, coupled):
        importance = tp.importance.BNScaleImportance(group_reduction="sum", normalizer=None)
        return {name: importance(tp_group(maps)).cpu() for name, maps in feature_maps(layers, outputs).items()}
