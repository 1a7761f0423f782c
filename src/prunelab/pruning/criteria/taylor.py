"""`taylor`: Molchanov, Tyree, Karras, Aila and Kautz 2017, "Pruning Convolutional Neural
Networks for Resource Efficient Inference" (ICLR 2017).

By hand, not Torch-Pruning's `TaylorImportance`: that one scores weights (|w * dL/dw| summed
over a filter's parameters), while the paper's criterion scores the feature map a filter makes
(|mean a * dL/da|), and the studies' numbers come from this implementation, kept bit for bit
(tests/pruning/test_taylor_reference.py)."""

from __future__ import annotations

import torch

from prunelab.pruning.criteria.base import Criterion


class TaylorCriterion(Criterion):
    """First-order Taylor expansion of the loss change when a feature map is removed.

    Per feature map k of a layer: |mean over samples and positions of a_k * dL/da_k|,
    where a_k is the conv's output. For a conv followed by ReLU this equals the
    same product taken after the ReLU (where the ReLU is off both factors vanish),
    so hooking the conv output serves either reading of the paper.

    Where a BatchNorm sits between the conv and its ReLU, `outputs` names it and
    its output is a_k: removing the filter deletes the normalised map (BN's channel
    goes too), while zeroing the conv's output would leave BN's shift in place, a
    different change of the loss.

    A layer whose channels are coupled (convs feeding one residual sum, a depthwise
    conv and the conv before it) deletes several maps with one filter index: `outputs`
    then names them all, and the score is |sum over those maps of each one's mean
    a_k * dL/da_k|, the first-order change of the loss when all of them go together.
    Scores are L2-normalised per layer (the paper's section 2.3).
    """

    name = "taylor"
    paper = "Molchanov et al. 2017, Pruning Convolutional Neural Networks for Resource Efficient Inference"
    needs_data = True

    def start(self, layers, maps):
        # Accumulated in float64 (long ranking passes), except on Apple's MPS, which has no float64.
        self.dtype = torch.float32 if next(iter(layers.values())).weight.device.type == "mps" else torch.float64
        self.sums = {name: [torch.zeros(conv.out_channels, dtype=self.dtype, device=conv.weight.device)
                            for _ in maps[name]] for name, conv in layers.items()}
        self.counts = {name: [0] * len(maps[name]) for name in layers}

    def accumulate(self, name, j, activation, grad):
        # Sum over batch and positions now; divide by the count at the end.
        self.sums[name][j] += (activation * grad).sum(dim=(0, 2, 3)).to(self.dtype)
        self.counts[name][j] += activation.shape[0] * activation.shape[2] * activation.shape[3]

    def result(self):
        scores = {name: _mean_change(self.sums[name], self.counts[name]).abs().float().cpu() for name in self.sums}
        del self.sums, self.counts
        return scores


def _mean_change(sums: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Each feature map's mean a * dL/da, summed over the maps one filter index deletes."""
    total = sums[0] / max(counts[0], 1)
    for s, c in zip(sums[1:], counts[1:]):
        total = total + s / max(c, 1)
    return total
