"""Transfer learning: pretrained features, computed once, under a trainable head.

While the features are frozen their output for an image never changes, so it
is computed once per image and the head trains on those cached vectors with
the ordinary loop (`train.fit`): the transfer phase pays for the frozen
convolutions once, not once per epoch. Never imports mlflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelab import checkpoints
from prunelab.config import TrainConfig
from prunelab.data.base import ImageData, batches
from prunelab.errors import ModelError
from prunelab.models.vgg import VGG16Transfer
from prunelab.train import EpochResult, fit

NO_WEIGHTS_HINT = ("pass --weights PATH (or transfer.weights=PATH) with a local VGG16 state dict such as "
                   "torchvision's vgg16-397923af.pth, or --no-pretrained (transfer.pretrained=false) to start from random features")


def build(data: ImageData, weights: str, pretrained: bool, head_width: int) -> tuple[VGG16Transfer, str]:
    """A fresh VGG16 with a new head; its features come from the state-dict file
    `weights`, else torchvision's ImageNet weights when `pretrained`, else stay
    random. Returns (model, where the weights came from)."""
    channels, side = data.input_shape[0], data.input_shape[-1]
    model = VGG16Transfer(in_channels=channels, num_classes=data.num_classes, hidden=head_width, image_size=side)
    if weights:
        state, source = read_state_dict(weights), weights
    elif pretrained:
        state, source = _torchvision_weights(), "torchvision:VGG16_Weights.IMAGENET1K_V1"
    else:
        return model, "random"
    load_features(model, state, source)
    return model, source


def _torchvision_weights() -> dict:
    from torchvision.models import VGG16_Weights

    try:
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise ModelError(f"torchvision's ImageNet VGG16 weights are not available here ({reason}): {NO_WEIGHTS_HINT}") from None


def read_state_dict(path: str | Path) -> dict:
    """A plain state dict (or {'state_dict': ...}) from a file, loaded with weights_only=True."""
    if not Path(path).is_file():
        raise ModelError(f"no weights file at {path}: {NO_WEIGHTS_HINT}")
    return checkpoints.state_dict_of(checkpoints.read(path), path)


def load_features(model: VGG16Transfer, state: dict, source: str) -> None:
    """Copy VGG16's conv weights from `state` (torchvision's key names); refuse any other architecture."""
    expected = {k: v.shape for k, v in model.features.state_dict().items()}
    found = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    missing = sorted(set(expected) - set(found))
    wrong = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    if missing or wrong:
        example = missing[0] if missing else f"{wrong[0]} is {tuple(found[wrong[0]].shape)}, expected {tuple(expected[wrong[0]])}"
        raise ModelError(f"{source} is not a VGG16 state dict (features.{example} missing or mismatched): "
                         "pass torchvision's vgg16 weights")
    model.features.load_state_dict({k: found[k] for k in expected})


@dataclass
class FeatureData(ImageData):
    """Cached head inputs in place of images: already float, so no normalisation."""

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def head_inputs(model: VGG16Transfer, x: torch.Tensor, normalise, batch_size: int, desc: str = "features") -> torch.Tensor:
    """The frozen features of every image, computed once (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    dummy = torch.zeros(len(x), dtype=torch.long)
    out = [model.head_input(xb) for xb, _ in tqdm(batches(x, dummy, batch_size, normalise), desc=desc, leave=False,
                                                  disable=None, total=(len(x) + batch_size - 1) // batch_size)]
    model.train(was_training)
    return torch.cat(out)


def feature_data(model: VGG16Transfer, data: ImageData, batch_size: int) -> FeatureData:
    """`data` with every image replaced by its cached head input."""
    train = head_inputs(model, data.train_x, data.normalise, batch_size, "features train")
    test = head_inputs(model, data.test_x, data.normalise, batch_size, "features test")
    return FeatureData(f"{data.name}:features", train, data.train_y, test, data.test_y, (), (), list(data.classes))


def train_head(model: VGG16Transfer, data: ImageData, cfg: TrainConfig, seed: int, feature_batch_size: int,
               on_epoch=None) -> list[EpochResult]:
    """Train only the head, on features computed once; the features stay frozen.

    Images are not augmented here: augmenting would change the features every
    epoch and defeat the cache. The global RNG is seeded with `seed` (dropout
    masks), so the same seed trains the same head as `fit` on the whole model
    with frozen features would.
    """
    model.set_features_trainable(False)
    cached = feature_data(model, data, feature_batch_size)
    torch.manual_seed(seed)
    return fit(model.classifier, cached, cfg, seed, on_epoch=on_epoch, desc="head")


def train_head_uncached(model: VGG16Transfer, data: ImageData, cfg: TrainConfig, seed: int) -> list[EpochResult]:
    """The same training through the frozen convolutions every step (the reference the cache must match)."""
    model.set_features_trainable(False)
    torch.manual_seed(seed)
    return fit(model, data, cfg, seed, desc="head uncached")


def head_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.classifier.state_dict().items()}
