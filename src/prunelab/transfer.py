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

from prunelab import checkpoints, layout, models, progress
from prunelab.config import TrainConfig
from prunelab.data.base import ImageData, batches
from prunelab.errors import ModelError
from prunelab.models.base import TransferBackbone
from prunelab.train import EpochResult, fit

NO_WEIGHTS_HINT = ("pass --weights PATH (or transfer.weights=PATH) with a local state dict of the pretrained network, "
                   "or --no-pretrained (transfer.pretrained=false) to start from random features")


def build(name: str, data: ImageData, weights: str, pretrained: bool, head_width: int) -> tuple[TransferBackbone, str]:
    """A fresh `name` (a `TransferBackbone`) for the data, with a new head (`head_width` wide
    hidden layers where its head has them, 0 where it is one Linear); its features come from the
    state-dict file `weights`, else the model's published weights when `pretrained`, else stay
    random. Returns (model, where the weights came from)."""
    model = models.build(name, data.input_shape, data.num_classes, **({"hidden": head_width} if head_width else {}))
    if weights:
        state, source = read_state_dict(weights), weights
    elif pretrained:
        state, source = model.published_features()
    else:
        return model, "random"
    model.load_features(state, source)
    return model, source


def read_state_dict(path: str | Path) -> dict:
    """A plain state dict (or {'state_dict': ...}) from a file, loaded with weights_only=True."""
    if not Path(path).is_file():
        raise ModelError(f"no weights file at {path}: {NO_WEIGHTS_HINT}")
    return checkpoints.state_dict_of(checkpoints.read(path), path)


@dataclass
class FeatureData(ImageData):
    """Cached head inputs in place of images: already float, so no normalisation."""

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def head_inputs(model: TransferBackbone, x: torch.Tensor, normalise, batch_size: int, desc: str = "features") -> torch.Tensor:
    """The frozen features of every image, computed once (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    dummy = torch.zeros(len(x), dtype=torch.long)
    with layout.native(model):
        out = [model.head_input(xb) for xb, _ in progress.bar(batches(x, dummy, batch_size, normalise), desc,
                                                              total=(len(x) + batch_size - 1) // batch_size)]
    model.train(was_training)
    return torch.cat(out)


def feature_data(model: TransferBackbone, data: ImageData, batch_size: int) -> FeatureData:
    """`data` with every image replaced by its cached head input."""
    train = head_inputs(model, data.train_x, data.normalise, batch_size, "features train")
    test = head_inputs(model, data.test_x, data.normalise, batch_size, "features test")
    return FeatureData(f"{data.name}:features", train, data.train_y, test, data.test_y, (), (), list(data.classes))


def train_head(model: TransferBackbone, data: ImageData, cfg: TrainConfig, seed: int, feature_batch_size: int,
               on_epoch=None) -> list[EpochResult]:
    """Train only the head, on features computed once; the features stay frozen.

    Images are not augmented here: augmenting would change the features every
    epoch and defeat the cache. The global RNG is seeded with `seed` (dropout
    masks), so the same seed trains the same head as `fit` on the whole model
    with frozen features would. The features are computed once in fp32, whatever
    `cfg.precision` says (only the head's steps use it): computed once, they cost
    little, and fp32 is what evaluation sees; so in bf16 the head differs from one
    trained through the convolutions by bf16's rounding of the features.
    """
    model.set_features_trainable(False)
    cached = feature_data(model, data, feature_batch_size)
    torch.manual_seed(seed)
    return fit(model.head(), cached, cfg, seed, on_epoch=on_epoch, desc="head")


def train_head_uncached(model: TransferBackbone, data: ImageData, cfg: TrainConfig, seed: int) -> list[EpochResult]:
    """The same training through the frozen convolutions every step (the reference the cache must match)."""
    model.set_features_trainable(False)
    torch.manual_seed(seed)
    return fit(model, data, cfg, seed, desc="head uncached")


def head_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.head().state_dict().items()}
