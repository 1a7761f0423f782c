"""The 2-conv CNN of the Taylor-criterion FashionMNIST study.

Conv2d(1,8,3,p=1)-ReLU-Conv2d(8,16,3,p=1)-ReLU-Flatten-Linear(16*28*28,10):
126,698 parameters. Channel widths are constructor arguments so a pruned
network is rebuilt from its `spec()` alone.
"""

from __future__ import annotations

from torch import nn


class SimpleCNN(nn.Module):
    def __init__(self, channels: tuple[int, int] | list[int] = (8, 16), in_channels: int = 1,
                 num_classes: int = 10, image_size: int = 28):
        super().__init__()
        c1, c2 = channels
        self.image_size = image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * image_size * image_size, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))

    def spec(self) -> dict:
        """Constructor arguments that rebuild this network at its current widths."""
        conv1, conv2 = self.features[0], self.features[2]
        return {
            "channels": [conv1.out_channels, conv2.out_channels],
            "in_channels": conv1.in_channels,
            "num_classes": self.classifier[1].out_features,
            "image_size": self.image_size,
        }

    def prunable_convs(self) -> dict[str, nn.Conv2d]:
        """Convs whose filters may be removed (both: nothing downstream is residual)."""
        return {"features.0": self.features[0], "features.2": self.features[2]}

    def feature_maps(self) -> dict[str, nn.Module]:
        """ReLU follows each conv directly: the conv's output is the feature map."""
        return self.prunable_convs()

    @staticmethod
    def spec_from_state_dict(state: dict) -> dict:
        """Widths read off a (possibly pruned) state dict."""
        w1, w2, fc = state["features.0.weight"], state["features.2.weight"], state["classifier.1.weight"]
        side = int(round((fc.shape[1] / w2.shape[0]) ** 0.5))
        return {"channels": [w1.shape[0], w2.shape[0]], "in_channels": w1.shape[1], "num_classes": fc.shape[0], "image_size": side}
