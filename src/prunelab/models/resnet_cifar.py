"""ResNet for CIFAR (He et al. 2016, section 4.2) as in Idelbayev's reference
implementation ("Proper ResNet Implementation for CIFAR10/CIFAR100 in PyTorch").

Depth 6n+2: a 3x3 stem conv with 16 filters, three stages (layer1..3) of n basic
blocks at 16 / 32 / 64 channels, global average pooling and a linear
classifier. Option-A shortcuts: where a block changes resolution it subsamples
by 2 and zero-pads the new channels, so shortcuts hold no parameters and the
reference state dicts load unchanged. Kaiming-normal initialisation of every
conv and linear weight, as the reference.

The first conv of each block ("block-internal": its outputs feed only the
block's second conv, never a residual sum) may be narrower than its stage:
`mid_widths` lists those widths block by block, so a merged or pruned network
is rebuilt from `spec()` alone.
"""

from __future__ import annotations

import re

from torch import nn
from torch.nn import functional as F

from prunelab.errors import ModelError

STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Option-A shortcut: stride-2 subsampling plus zero-padded channels.

    A module rather than the reference's lambda so the network pickles and
    exports; it holds no parameters, so state dict keys are unchanged."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, mid: int | None = None):
        super().__init__()
        mid = mid or planes
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Sequential()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """Base class; the registered subclasses fix DEPTH."""

    DEPTH = 20

    def __init__(self, num_classes: int = 10, in_channels: int = 3, mid_widths: list[int] | None = None):
        super().__init__()
        n = self.blocks_per_stage()
        mids = list(mid_widths) if mid_widths else [w for w in STAGE_WIDTHS for _ in range(n)]
        if len(mids) != 3 * n:
            raise ModelError(f"{type(self).__name__} has {3 * n} blocks, mid_widths lists {len(mids)}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for s, planes in enumerate(STAGE_WIDTHS):
            blocks = []
            for i in range(n):
                stride = 2 if s > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, mids[s * n + i]))
                in_planes = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @classmethod
    def blocks_per_stage(cls) -> int:
        return (cls.DEPTH - 2) // 6

    def head_input(self, x):
        """The pooled features the classifier sees (64 per image)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x):
        return self.linear(self.head_input(x))

    # Transfer learning (models/base.TransferBackbone): everything but `linear` is the
    # feature extractor, so a CIFAR-10 checkpoint gives the features and a new
    # `linear` of the new task's classes is the head.

    def head(self) -> nn.Module:
        return self.linear

    def set_features_trainable(self, trainable: bool) -> None:
        for name, p in self.named_parameters():
            if not name.startswith("linear."):
                p.requires_grad_(trainable)

    def load_features(self, state: dict, source: str) -> None:
        """Every weight and BN statistic but the classifier's, from a state dict of this depth
        at full widths (the reference checkpoints); anything else is refused in one line."""
        try:
            type(self).spec_from_state_dict(state)  # names the depth a checkpoint of another one fits
        except ModelError as exc:
            raise ModelError(f"{source}: {exc}") from None
        except KeyError as exc:
            raise ModelError(f"{source} is not a CIFAR ResNet state dict ({exc.args[0]} missing)") from None
        # The reference checkpoints predate BatchNorm's num_batches_tracked, which eval never reads.
        own = {k: v for k, v in self.state_dict().items()
               if not k.startswith("linear.") and not k.endswith("num_batches_tracked")}
        wrong = [k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            found = tuple(state[wrong[0]].shape) if wrong[0] in state else "missing"
            raise ModelError(f"{source} does not fit an unpruned resnet{self.DEPTH} ({wrong[0]} is {found}, expected "
                             f"{tuple(own[wrong[0]].shape)}): pass the pretrained checkpoint, not a pruned or merged one")
        self.load_state_dict({k: state[k] for k in own}, strict=False)

    @classmethod
    def published_features(cls) -> tuple[dict, str]:
        raise ModelError(f"resnet{cls.DEPTH} has no published weights prunelab can fetch: pass --weights PATH "
                         "(or transfer.weights=PATH) with a CIFAR-10 checkpoint of it, such as the reference "
                         "resnet20-12fca82f.th, or --no-pretrained (transfer.pretrained=false) to start from random features")

    def blocks(self) -> list[tuple[str, BasicBlock]]:
        """(name, block) of every basic block in network order."""
        return [(f"layer{s}.{i}", b) for s in (1, 2, 3) for i, b in enumerate(getattr(self, f"layer{s}"))]

    def spec(self) -> dict:
        return {"num_classes": self.linear.out_features, "in_channels": self.conv1.in_channels,
                "mid_widths": [b.conv1.out_channels for _, b in self.blocks()]}

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """Every conv in network order (stem, then each block's conv1, conv2)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, nn.Conv2d)}

    def stage_convs(self) -> dict[str, list[str]]:
        """Stage name -> its convs; the stem conv belongs to no stage."""
        convs = list(self.conv_layers())
        return {f"layer{s}": [c for c in convs if c.startswith(f"layer{s}.")] for s in (1, 2, 3)}

    def prunable_convs(self) -> dict[str, nn.Conv2d]:
        """Only block-internal convs: the others feed residual sums whose option-A
        shortcut (subsample + pad) no tracer can follow."""
        return {f"{name}.conv1": b.conv1 for name, b in self.blocks()}

    def feature_maps(self) -> dict[str, nn.Module]:
        """Each block's conv1 feeds bn1, then ReLU: the normalised map is the one a filter's removal deletes."""
        return {f"{name}.conv1": b.bn1 for name, b in self.blocks()}

    @classmethod
    def spec_from_state_dict(cls, state: dict) -> dict:
        """Widths read off a state dict; a checkpoint of another depth is refused naming the depth it fits."""
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer1\.(\d+)\.conv1\.weight$", k))}
        if not blocks or "linear.weight" not in state:
            raise ModelError("the checkpoint holds no CIFAR ResNet (no layer1.N.conv1 / linear weights)")
        depth = 6 * (max(blocks) + 1) + 2
        if depth != cls.DEPTH:
            fits = f"resnet{depth}" if f"resnet{depth}" in DEPTHS else f"a depth-{depth} ResNet, which prunelab does not define"
            raise ModelError(f"the checkpoint is for {fits} ({max(blocks) + 1} blocks per stage), not resnet{cls.DEPTH}: "
                             f"pass --model resnet{depth}")
        n = cls.blocks_per_stage()
        return {"num_classes": state["linear.weight"].shape[0], "in_channels": state["conv1.weight"].shape[1],
                "mid_widths": [state[f"layer{s}.{i}.conv1.weight"].shape[0] for s in (1, 2, 3) for i in range(n)]}


class ResNet20(ResNetCifar):
    DEPTH = 20


class ResNet32(ResNetCifar):
    DEPTH = 32


class ResNet44(ResNetCifar):
    DEPTH = 44


class ResNet56(ResNetCifar):
    DEPTH = 56


class ResNet110(ResNetCifar):
    DEPTH = 110


class ResNet1202(ResNetCifar):
    DEPTH = 1202


# name -> class; one class per depth so a checkpoint names its architecture.
DEPTHS: dict[str, type[ResNetCifar]] = {f"resnet{c.DEPTH}": c for c in (ResNet20, ResNet32, ResNet44, ResNet56, ResNet110, ResNet1202)}
