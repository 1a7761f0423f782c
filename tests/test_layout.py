"""A network takes its device's memory layout for passes over many images (channels-last on
the CPU) and rests in the default layout, in which it is logged, saved and timed."""

import copy

import torch
from torch import nn

from prunelab import checkpoints, config, data, layout
from prunelab.models.pixels import PixelInput
from prunelab.models.simple_cnn import SimpleCNN
from prunelab.train import evaluate, fit

CL = torch.channels_last


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def test_a_network_is_channels_last_inside_the_block_and_in_the_default_layout_after():
    model = SimpleCNN()
    before = list(model.parameters())
    assert layout.memory_format(torch.device("cpu")) == CL
    with layout.native(model):
        assert _is_channels_last(model.features[2].weight)
        # One input channel is contiguous in both layouts; it must still carry channels-last
        # strides, or oneDNN runs that conv in NCHW (slower, and other sums).
        assert model.features[0].weight.stride() == (9, 1, 3, 1)
        with layout.native(model):  # an evaluation inside training leaves the outer block's layout alone
            pass
        assert _is_channels_last(model.features[2].weight)
        with layout.native(PixelInput(model, (0.5,), (0.25,))):  # and so does one over a wrapper of it
            pass
        assert _is_channels_last(model.features[2].weight)
        assert model.classifier[1].weight.is_contiguous()  # only 4-D tensors change
    assert model.features[2].weight.is_contiguous() and not _is_channels_last(model.features[2].weight)
    # The same Parameter objects: an optimiser made before the block still holds the model's weights.
    assert all(a is b for a, b in zip(before, model.parameters()))


def test_gradients_in_the_native_layout_equal_those_of_the_default_layout():
    """The gradient that comes back through Flatten is put into channels-last; the values stay."""
    torch.manual_seed(0)
    model = SimpleCNN()
    reference = copy.deepcopy(model)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with layout.native(model):
        nn.functional.cross_entropy(model(x), y).backward()
        assert model.classifier[0]._forward_pre_hooks  # the hook is on while the block runs
    nn.functional.cross_entropy(reference(x), y).backward()
    assert model.classifier[0]._forward_pre_hooks == {}  # and gone after it
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_training_and_evaluation_leave_the_network_in_the_default_layout_and_score_as_it_does():
    d = data.get(config.DataConfig(dataset="fashionmnist", n_train=256, n_test=200))
    torch.manual_seed(0)
    model = SimpleCNN()
    fit(model, d, config.TrainConfig(epochs=1, batch_size=64, optimizer="adam", precision="fp32"), seed=0)
    assert model.features[2].weight.is_contiguous()
    got = evaluate(model, d.test_x, d.test_y, d.normalise)
    with torch.no_grad():  # the plain NCHW forward pass, outside any layout block
        out = model.eval()(d.normalise(d.test_x))
    assert got["accuracy"] == (out.argmax(1) == d.test_y).float().mean().item()
    assert abs(got["loss"] - nn.functional.cross_entropy(out, d.test_y).item()) < 1e-5


def test_a_checkpoint_holds_default_layout_tensors(tmp_path):
    model = SimpleCNN()
    with layout.native(model):  # saved mid-training (a lottery-ticket snapshot): still the default layout
        path = checkpoints.save(model, tmp_path / "model.pt")
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(t.is_contiguous() for t in saved.values())
    assert not _is_channels_last(saved["features.2.weight"])
