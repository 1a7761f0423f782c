"""LeNet-300-100 of the lottery-ticket study: a fully connected 784-300-100-10
network for MNIST-shaped data (266,610 parameters), Glorot-normal weights."""

from __future__ import annotations

from torch import nn

from prunelab.models.conv import glorot_normal_


class LeNet300100(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 300), nn.ReLU(inplace=True),
            nn.Linear(300, 100), nn.ReLU(inplace=True),
            nn.Linear(100, num_classes),
        )
        glorot_normal_(self)

    def forward(self, x):
        return self.classifier(x)

    def spec(self) -> dict:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "image_size": self.image_size}

    @staticmethod
    def spec_from_state_dict(state: dict) -> dict:
        inputs = state["classifier.1.weight"].shape[1]
        # Square single-channel images unless the input size says three channels.
        channels = 3 if inputs % 3 == 0 and int(round((inputs / 3) ** 0.5)) ** 2 * 3 == inputs else 1
        return {"in_channels": channels, "num_classes": state["classifier.5.weight"].shape[0],
                "image_size": int(round((inputs / channels) ** 0.5))}
