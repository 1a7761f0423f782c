"""Conv-2, Conv-4 and Conv-6 of the lottery-ticket study (Frankle & Carbin 2019, fig. 2).

VGG-like: pairs of 3x3 convs (padding 1) each followed by 2x2 max-pooling,
then FC 256 - FC 256 - FC 10. Conv-2 on 32x32 CIFAR-10 has 4,301,642
parameters (1,792 + 36,928 + 4,194,560 + 65,792 + 2,570). Glorot-normal
weights and zero biases, as in the paper. The widths never change (lottery
tickets prune with masks, not surgery), so `spec()` holds only the input and
output sizes.
"""

from __future__ import annotations

from torch import nn

FC_WIDTHS = (256, 256)


def glorot_normal_(module: nn.Module) -> None:
    """Glorot-normal weights and zero biases on every conv and linear layer."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvNet(nn.Module):
    """A stack of conv pairs (`widths`, one per pair) with max-pooling, then the FC head."""

    widths: tuple[int, ...] = ()

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        layers: list[nn.Module] = []
        channels = in_channels
        for width in self.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(self.widths)
        head: list[nn.Module] = [nn.Flatten()]
        features = channels * side * side
        for width in FC_WIDTHS:
            head += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            features = width
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)
        glorot_normal_(self)

    def forward(self, x):
        return self.classifier(self.features(x))

    def spec(self) -> dict:
        """Constructor arguments that rebuild this network."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "image_size": self.image_size}

    @classmethod
    def spec_from_state_dict(cls, state: dict) -> dict:
        """Input and output sizes read off a state dict (the FC input gives the image side)."""
        first, fc = state["features.0.weight"], state["classifier.1.weight"]
        side = int(round((fc.shape[1] / cls.widths[-1]) ** 0.5)) * 2 ** len(cls.widths)
        return {"in_channels": first.shape[1], "num_classes": state[f"classifier.{2 * len(FC_WIDTHS) + 1}.weight"].shape[0],
                "image_size": side}


class Conv2(ConvNet):
    widths = (64,)


class Conv4(ConvNet):
    widths = (64, 128)


class Conv6(ConvNet):
    widths = (64, 128, 256)
