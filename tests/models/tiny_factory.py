"""A user's own network factories, as the tests name them: `tests.models.tiny_factory:build`.

`build` makes a small residual CNN with a BatchNorm after every conv, a
depthwise conv and a Linear classifier: the couplings the dependency graph must
find, at a size a test trains in seconds. `chain` is a plain chain of convs
(VGG's shape, the last without BatchNorm) read by a Linear layer through a
flatten: what k-means merging may merge in every other conv. The other factories go wrong, one way
each, for tests/test_bad_inputs.py.
"""

from __future__ import annotations

import torch
from torch import nn


class TinyResidual(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))  # a residual sum: stem and the block's last conv are coupled
        return self.head(self.pool(x).flatten(1))


def build(num_classes: int, in_channels: int = 1) -> nn.Module:
    return TinyResidual(in_channels, num_classes)


def chain(num_classes: int, in_channels: int = 1) -> nn.Module:
    """28 x 28 images: conv-BN-ReLU (stride 2), conv-BN-ReLU, max-pool, conv with bias, flatten, Linear."""
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 7 * 7, num_classes))


def not_a_module(num_classes: int):
    return {"classes": num_classes}


def thousand_classes() -> nn.Module:
    return TinyResidual(1, 1000)


def no_convs(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, num_classes))


def raises(num_classes: int) -> nn.Module:
    raise RuntimeError("the factory's own mistake")


NOT_CALLABLE = 42
