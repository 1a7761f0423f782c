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
from prunelab.models.factory import FactoryNetwork
from prunelab.train import EpochResult, fit

NO_WEIGHTS_HINT = ("pass --weights PATH (or transfer.weights=PATH) with a local state dict of the pretrained network, "
                   "or --no-pretrained (transfer.pretrained=false) to start from random features")


class ClassifierHead:
    """`TransferBackbone` for a network from a factory (`torchvision:NAME`, your own), found from
    its modules rather than written for it: the head is its last Linear (the classifier), the
    features everything before it. Registered networks declare theirs themselves."""

    def __init__(self, model: FactoryNetwork):
        linears = [(n, m) for n, m in model.network.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ModelError(f"{model.factory} has no Linear layer to serve as the new head: a transfer study trains "
                             "a new classifier on its features")
        self.model, (self.name, self.linear) = model, linears[-1]

    def head(self) -> nn.Module:
        return self.linear

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the classifier receives, caught on its way in (the whole forward pass runs; the
        classifier is a small share of it)."""
        seen = []
        hook = self.linear.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        try:
            self.model(x)
        finally:
            hook.remove()
        return seen[-1]

    def set_features_trainable(self, trainable: bool) -> None:
        head = {id(p) for p in self.linear.parameters()}
        for p in self.model.parameters():
            if id(p) not in head:
                p.requires_grad_(trainable)

    def load_features(self, state: dict, source: str) -> None:
        """Every tensor of the file but the classifier's: the head stays new."""
        features = {k: v for k, v in state.items() if not k.startswith(f"{self.name}.")}
        checkpoints.load_pretrained(self.model, features, source)

    def published_features(self) -> tuple[dict, str]:
        return (checkpoints.pretrained_state(checkpoints.DEFAULT_WEIGHTS, self.model.factory),
                f"{self.model.factory} {checkpoints.DEFAULT_WEIGHTS}")


def backbone(model: nn.Module) -> TransferBackbone:
    """The transfer protocol of `model`: its own, or `ClassifierHead`'s for a network from a factory."""
    return ClassifierHead(model) if isinstance(model, FactoryNetwork) else model


def build(name: str, data: ImageData, weights: str, pretrained: bool, head_width: int) -> tuple[nn.Module, str]:
    """A fresh `name` for the data, with a new head (`head_width` wide hidden layers where its head
    has them, 0 where it is one Linear); its features come from the state-dict file `weights`, else
    the model's published weights when `pretrained`, else stay random. Returns (model, where the
    weights came from)."""
    model = models.build(name, data.input_shape, data.num_classes, **({"hidden": head_width} if head_width else {}))
    if weights:
        state, source = read_state_dict(weights), weights
    elif pretrained:
        state, source = backbone(model).published_features()
    else:
        return model, "random"
    backbone(model).load_features(state, source)
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
def head_inputs(model: nn.Module, x: torch.Tensor, normalise, batch_size: int, desc: str = "features") -> torch.Tensor:
    """The frozen features of every image, computed once (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    dummy = torch.zeros(len(x), dtype=torch.long)
    with layout.native(model):
        out = [backbone(model).head_input(xb) for xb, _ in progress.bar(batches(x, dummy, batch_size, normalise), desc,
                                                              total=(len(x) + batch_size - 1) // batch_size)]
    model.train(was_training)
    return torch.cat(out)


def feature_data(model: nn.Module, data: ImageData, batch_size: int) -> FeatureData:
    """`data` with every image replaced by its cached head input."""
    train = head_inputs(model, data.train_x, data.normalise, batch_size, "features train")
    test = head_inputs(model, data.test_x, data.normalise, batch_size, "features test")
    return FeatureData(f"{data.name}:features", train, data.train_y, test, data.test_y, (), (), list(data.classes))


def train_head(model: nn.Module, data: ImageData, cfg: TrainConfig, seed: int, feature_batch_size: int,
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
    backbone(model).set_features_trainable(False)
    cached = feature_data(model, data, feature_batch_size)
    torch.manual_seed(seed)
    return fit(backbone(model).head(), cached, cfg, seed, on_epoch=on_epoch, desc="head")


def train_head_uncached(model: nn.Module, data: ImageData, cfg: TrainConfig, seed: int) -> list[EpochResult]:
    """The same training through the frozen convolutions every step (the reference the cache must match)."""
    backbone(model).set_features_trainable(False)
    torch.manual_seed(seed)
    return fit(model, data, cfg, seed, desc="head uncached")


def head_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone(model).head().state_dict().items()}
