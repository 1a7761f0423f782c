"""The one ranking loop: forward and backward passes over the ranking batches, with hooks
on each layer's feature maps that hand every map and its gradient to a criterion.

A data-driven criterion (`base.Criterion.needs_data`) only accumulates what it is handed;
it never registers a hook or runs the network itself. A data-free one never comes here.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from prunelab import layout, progress

Accumulate = Callable[[str, int, torch.Tensor, torch.Tensor], None]


def run(model: nn.Module, maps: dict[str, tuple[nn.Module, ...]], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        total: int | None, accumulate: Accumulate, per_image: Callable[[], None] | None = None) -> None:
    """One pass over `batches` (cross-entropy loss, the model in eval mode): for the j-th
    feature-map module of layer `name`, `accumulate(name, j, activation, grad)` with its output
    and the loss's gradient there, once per batch.

    With `per_image` (a second-order criterion: the diagonal Fisher needs each image's own
    gradient, which a batch's summed gradient cannot give) each image's loss is backpropagated
    alone and `per_image()` called after each, the weights' `.grad` holding that image's
    gradient; the feature-map hooks then fire once per image."""
    handles = []

    def hook(name, j):
        def on_forward(_module, _inputs, output):
            # The gradient hook holds a detached copy, never `output` itself: a hook that
            # refers to the tensor it is registered on is a cycle through autograd's C++
            # side, which Python's collector cannot see, and every ranked batch's feature
            # maps would stay in memory for the life of the process (GBs per study). A copy,
            # not a view: a residual sum added in place onto the map (`out += identity`)
            # would otherwise change the values it holds. (An in-place ReLU changes nothing
            # that counts: where it zeroes the map the gradient is zero too.)
            activation = output.detach().clone()

            def on_grad(grad):
                accumulate(name, j, activation, grad)
            output.register_hook(on_grad)
        return on_forward

    for name, modules in maps.items():
        handles += [module.register_forward_hook(hook(name, j)) for j, module in enumerate(modules)]
    was_training = model.training
    model.eval()  # rank the network as it predicts: no dropout noise in the scores
    try:
        with layout.native(model):
            for xb, yb in progress.bar(batches, "rank", total=total):
                if per_image is None:
                    model.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    loss.backward()
                    continue
                losses = nn.functional.cross_entropy(model(xb), yb, reduction="none")
                for n, loss in enumerate(losses):
                    model.zero_grad(set_to_none=True)
                    loss.backward(retain_graph=n < len(losses) - 1)
                    per_image()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
