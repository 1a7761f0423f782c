"""VGG16 for transfer learning: torchvision's VGG16 features under a new head.

features (13 convs, configuration D) - AdaptiveAvgPool2d(7) - Flatten -
Dropout - Linear(512*7*7, hidden) - ReLU - Dropout - Linear(hidden, hidden) -
ReLU - Linear(hidden, num_classes), with hidden = 4096 as in the study
(134,268,738 parameters for two classes). Module names follow torchvision's
(`features.0`, `features.2`, ...), so an ImageNet state dict loads into
`features` unchanged. The adaptive pooling keeps the head's input at 7x7 per
channel at any image size, so parameter counts do not depend on the
resolution (at 32 px it replicates the single 1x1 map 49 times).
"""

from __future__ import annotations

from torch import nn

from prunelab.errors import ModelError

# Output channels of VGG16's convs; "M" is a 2x2 max-pool (torchvision's cfg "D").
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_WIDTHS = tuple(c for c in VGG16_LAYOUT if c != "M")
POOLED_SIDE = 7
WEIGHTS_HINT = ("pass --weights PATH (or transfer.weights=PATH) with a local VGG16 state dict such as "
                "torchvision's vgg16-397923af.pth, or --no-pretrained (transfer.pretrained=false) to start from random features")


def make_features(widths, in_channels: int = 3) -> nn.Sequential:
    """VGG16's feature extractor with the given conv widths (13 of them)."""
    if len(widths) != len(VGG16_WIDTHS):
        raise ValueError(f"VGG16 has {len(VGG16_WIDTHS)} convs, got {len(widths)} widths")
    layers: list[nn.Module] = []
    it = iter(widths)
    channels = in_channels
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            width = int(next(it))
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


class VGG16Transfer(nn.Module):
    def __init__(self, widths: tuple[int, ...] | list[int] = VGG16_WIDTHS, in_channels: int = 3,
                 num_classes: int = 2, hidden: int = 4096, image_size: int = 224):
        super().__init__()
        self.image_size = image_size
        self.features = make_features(widths, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((POOLED_SIDE, POOLED_SIDE))
        self.flatten = nn.Flatten()
        last = int(widths[-1])
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(last * POOLED_SIDE * POOLED_SIDE, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def head(self) -> nn.Module:
        return self.classifier

    def head_input(self, x):
        """What the head sees: pooled, flattened features (cached while the features are frozen)."""
        return self.flatten(self.avgpool(self.features(x)))

    def forward(self, x):
        return self.classifier(self.head_input(x))

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def spec(self) -> dict:
        """Constructor arguments that rebuild this network at its current widths."""
        convs = self.convs()
        return {"widths": [c.out_channels for c in convs], "in_channels": convs[0].in_channels,
                "num_classes": self.classifier[6].out_features, "hidden": self.classifier[1].out_features,
                "image_size": self.image_size}

    def prunable_convs(self) -> dict[str, nn.Conv2d]:
        """All 13 convs: a plain chain, nothing residual, so any filter may go."""
        return {f"features.{i}": m for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)}

    def feature_maps(self) -> dict[str, nn.Module]:
        """ReLU follows each conv directly: the conv's output is the feature map."""
        return self.prunable_convs()

    def set_features_trainable(self, trainable: bool) -> None:
        for p in self.features.parameters():
            p.requires_grad_(trainable)

    def load_features(self, state: dict, source: str) -> None:
        """Copy VGG16's conv weights from `state` (torchvision's key names); refuse any other architecture."""
        expected = {k: v.shape for k, v in self.features.state_dict().items()}
        found = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        missing = sorted(set(expected) - set(found))
        wrong = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
        if missing or wrong:
            example = missing[0] if missing else f"{wrong[0]} is {tuple(found[wrong[0]].shape)}, expected {tuple(expected[wrong[0]])}"
            raise ModelError(f"{source} is not a VGG16 state dict (features.{example} missing or mismatched): "
                             "pass torchvision's vgg16 weights")
        self.features.load_state_dict({k: found[k] for k in expected})

    @classmethod
    def published_features(cls) -> tuple[dict, str]:
        """torchvision's ImageNet weights (downloaded once into torch's hub cache)."""
        from torchvision.models import VGG16_Weights

        try:
            return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False), "torchvision:VGG16_Weights.IMAGENET1K_V1"
        except Exception as exc:
            reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise ModelError(f"torchvision's ImageNet VGG16 weights are not available here ({reason}): {WEIGHTS_HINT}") from None

    @staticmethod
    def spec_from_state_dict(state: dict) -> dict:
        """Widths read off a (possibly pruned) state dict of this class."""
        conv_keys = sorted((k for k in state if k.startswith("features.") and k.endswith(".weight")),
                           key=lambda k: int(k.split(".")[1]))
        widths = [state[k].shape[0] for k in conv_keys]
        spec = {"widths": widths, "in_channels": state[conv_keys[0]].shape[1]} if conv_keys else {}
        if "classifier.1.weight" in state and "classifier.6.weight" in state:
            spec.update(hidden=state["classifier.1.weight"].shape[0], num_classes=state["classifier.6.weight"].shape[0])
        return spec
