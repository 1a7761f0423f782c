"""The memory layout a device's convolution kernels run batches fastest in.

On the CPU, oneDNN's convolutions work on channels-last (NHWC) tensors; a
network held in PyTorch's default NCHW layout is reordered around every call.
Measured on a 2-core AVX-512 CPU (`benchmarks/bench_scale.py`): the
FashionMNIST CNN's bf16 training step (batch 128) drops from 8.1 to 6.8 ms,
its pruned (7, 9)-filter version from 12.5 to 5.2 ms (NCHW kernels for odd
widths are the slowest of all), Conv-2's (batch 60) from 81 to 52 ms. One
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
_ACTIVE: set[int] = set()  # models inside a `native` block (an evaluation within training nests)


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The layout 4-D weights and activations take on `device` for batched passes."""
    return _LAYOUTS.get(torch.device(device).type, torch.contiguous_format)


@contextlib.contextmanager
def native(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in its device's layout for the block, gradients coming back through its Flatten
    modules restored to that layout, and the default layout again afterwards. In place: the
    same Parameter objects stay, so an optimiser made before or inside still holds them."""
    first = next(model.parameters(), None)
    fmt = memory_format(first.device) if first is not None else torch.contiguous_format
    if fmt is torch.contiguous_format or id(model) in _ACTIVE:
        yield model
        return

    def in_layout(grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=fmt)

    def before_flatten(_module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.requires_grad:
            x.register_hook(in_layout)

    _ACTIVE.add(id(model))
    model.to(memory_format=fmt)
    handles = [m.register_forward_pre_hook(before_flatten) for m in model.modules() if isinstance(m, nn.Flatten)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        model.to(memory_format=torch.contiguous_format)
        _ACTIVE.discard(id(model))
