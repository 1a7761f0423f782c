"""A network as a person gets it: it takes float pixels in [0, 1], N x C x H x W.

Inside prunelab a network takes images already standardised with its data
set's mean and std (the training loop does that a batch at a time). A logged
model must not need that private knowledge, so the network is wrapped with its
normalisation before export: the mean and std are buffers, saved with the
weights in every exported format (pt2, ONNX).
"""

from __future__ import annotations

import torch
from torch import nn


class PixelInput(nn.Module):
    """`network` behind its data set's per-channel normalisation."""

    def __init__(self, network: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The same operations, in the same order, as ImageData.normalise: identical outputs.
        return self.network((pixels - self.mean) / self.std)
