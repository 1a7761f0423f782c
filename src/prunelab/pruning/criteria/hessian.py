"""`hessian`: Optimal Brain Damage (LeCun, Denker and Solla 1990, "Optimal Brain Damage", NeurIPS 2),
grouped over a filter's weights as in Torch-Pruning's `GroupHessianImportance`.

The saliency of a weight is the second-order change of the loss when it is set to zero,
h_ii * w_i^2 / 2, with the Hessian's diagonal h_ii approximated by the empirical Fisher: the
mean over ranking images of the squared per-image gradient dL_n/dw_i. A filter's score sums
the saliencies of its weights over every conv one filter index removes.

The per-image gradients come from the one ranking loop (`ranking.run` with `per_image`), which
backpropagates each image's loss on its own; this criterion only sums their squares. The
scoring itself is Torch-Pruning's `GroupHessianImportance` over the layer's convs' output
channels (`base.tp_group`), handed the Fisher as each conv's `.grad`: its own
`accumulate_grad` keys its sums by parameter but checks them by name, so it keeps only the
last image's gradient, and is not used.
"""

from __future__ import annotations

import torch
import torch_pruning as tp

from prunelab.pruning.criteria.base import Criterion, tp_group


class HessianCriterion(Criterion):
    """Sum over a filter's weights (of all the convs one index removes) of w^2 * F / 2, F the
    mean squared per-image gradient (the diagonal Fisher, OBD's Hessian estimate)."""

    name = "hessian"
    paper = "LeCun et al. 1990, Optimal Brain Damage"
    needs_data = True
    per_image = True  # the ranking loop backpropagates each image alone

    def start(self, layers, maps):
        self.groups = self.coupled_convs
        convs = {id(c): c for group in self.groups.values() for c in group}
        self.convs = list(convs.values())
        # Accumulated in float64 (long ranking passes), except on Apple's MPS, which has no float64.
        self.dtype = torch.float32 if self.convs[0].weight.device.type == "mps" else torch.float64
        self.fisher = {id(c): torch.zeros_like(c.weight, dtype=self.dtype) for c in self.convs}
        self.images = 0

    def accumulate(self, name, j, activation, grad):
        """Feature maps are not what OBD scores: the weights' gradients are (`accumulate_image`)."""

    def accumulate_image(self) -> None:
        for conv in self.convs:
            if conv.weight.grad is not None:
                self.fisher[id(conv)] += conv.weight.grad.to(self.dtype).square()
        self.images += 1

    def result(self):
        importance = tp.importance.GroupHessianImportance(group_reduction="sum", normalizer=None)
        saved = {id(c): c.weight.grad for c in self.convs}
        try:
            for conv in self.convs:
                conv.weight.grad = (self.fisher[id(conv)] / max(self.images, 1)).to(conv.weight.dtype)
            scores = {name: (importance(tp_group(convs)) / 2).float().cpu() for name, convs in self.groups.items()}
        finally:
            for conv in self.convs:
                conv.weight.grad = saved[id(conv)]
        del self.fisher, self.convs, self.groups
        return scores
