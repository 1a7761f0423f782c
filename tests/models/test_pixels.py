"""PixelInput: a network that takes float pixels in [0, 1] gives exactly what the bare
network gives on the normalised images, for one and three channels."""

from __future__ import annotations

import torch

from prunelab import config, data, models
from prunelab.models.pixels import PixelInput


def test_pixels_in_same_outputs_as_normalised_in(fashion_dir):
    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=100))
    torch.manual_seed(0)
    network = models.build("simple_cnn", d.input_shape, d.num_classes).eval()
    with torch.no_grad():
        assert torch.equal(PixelInput(network, d.mean, d.std)(d.pixels(d.test_x)), network(d.normalise(d.test_x)))


def test_three_channels_and_buffers(cifar_dir):
    d = data.get(config.DataConfig(dataset="cifar10", data_dir=str(cifar_dir), n_test=50))
    torch.manual_seed(0)
    network = models.build("resnet20", d.input_shape, d.num_classes).eval()
    wrapped = PixelInput(network, d.mean, d.std)
    assert {"mean", "std"} <= {n for n, _ in wrapped.named_buffers()}  # saved with the weights in every format
    with torch.no_grad():
        torch.testing.assert_close(wrapped(d.pixels(d.test_x)), network(d.normalise(d.test_x)), rtol=0, atol=1e-6)


def test_the_wrapper_takes_the_networks_mode(fashion_dir):
    """Logging a model switches the wrapper to eval and back: the network must come back in its own mode."""
    from prunelab.studies.common import for_users

    d = data.get(config.DataConfig(dataset="fashionmnist", n_test=10))
    network = models.build("simple_cnn", d.input_shape, d.num_classes)
    for training in (False, True):
        network.train(training)
        wrapped = for_users(network, d)
        assert wrapped.training is training and network.training is training
        was = wrapped.training  # what Run.log_model does around the export
        wrapped.eval()
        wrapped.train(was)
        assert network.training is training
