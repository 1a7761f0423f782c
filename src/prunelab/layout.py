"""The memory layout a device's convolution kernels run batches fastest in.

On the CPU, oneDNN's convolutions work on channels-last (NHWC) tensors; a
network held in PyTorch's default NCHW layout is reordered around every call.
Measured on a 2-core AVX-512 CPU (`benchmarks/bench_scale.py`, the
"Scale" rows of docs/benchmarks.md): a bf16 training step is 1.27x faster for the FashionMNIST CNN
(batch 128), 2.59x for its pruned (7, 9)-filter version (NCHW kernels for odd
widths are the slowest of all) and 1.36x for Conv-2 (batch 60). One
image at a time is the other way round (the same bench times the CNN both
ways), so a network rests in the default layout, as it is logged, saved and
timed, and takes its device's layout only for the passes over many images:
training, ranking, evaluation (`native`). Elsewhere (CUDA, MPS) the default
layout is kept: nothing was measured there.

Gradients flowing back through a Flatten arrive in NCHW order (the flattened
vector is laid out that way); left so, the ReLU and convolution before it run
their backward passes on mixed layouts, slower than either. `native` puts
those gradients back into the device's layout.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

_LAYOUTS = {"cpu": torch.channels_last}
# The weights a `native` block has put in its device's layout, by identity: a block inside it
# (an evaluation within training, or one over a wrapper of the same network) leaves them there.
_IN_LAYOUT: set[int] = set()


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout 4-D weights and activations take on `device` for batched passes."""
    return _LAYOUTS.get(torch.device(device).type, torch.contiguous_format)


@contextlib.contextmanager
def native(model: nn.Module) -> Iterator[nn.Module]:
    """`model`'s conv weights in its device's layout for the block, gradients coming back through
    its Flatten modules restored to that layout, and the default layout again afterwards. In
    place: the same Parameter objects stay, so an optimiser made before or inside holds them."""
    weights = [p for p in model.parameters() if p.dim() == 4 and id(p) not in _IN_LAYOUT]
    fmt = memory_format(weights[0].device) if weights else torch.contiguous_format
    if fmt is torch.contiguous_format:
        yield model
        return

    def in_layout(grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=fmt)

    def before_flatten(_module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.requires_grad:
            x.register_hook(in_layout)

    _move(weights, fmt)
    _IN_LAYOUT.update(id(p) for p in weights)
    handles = [m.register_forward_pre_hook(before_flatten) for m in model.modules() if isinstance(m, nn.Flatten)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        _IN_LAYOUT.difference_update(id(p) for p in weights)
        _move(weights, torch.contiguous_format)


@torch.no_grad()
def _move(weights: list[nn.Parameter], fmt: torch.memory_format) -> None:
    # As Module.to does it: the Parameter keeps its identity, its data (and gradient) change layout.
    # `.to`, not `.contiguous`: a weight with one input channel counts as contiguous in both
    # layouts, and `.contiguous` would leave its NCHW strides, which make oneDNN pick NCHW kernels.
    for p in weights:
        p.data = p.data.to(memory_format=fmt)
        if p.grad is not None:
            p.grad = p.grad.to(memory_format=fmt)
