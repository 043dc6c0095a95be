"""The ONNX export against torch, in process: the same probabilities to 1e-5 on the tiny test images,
for the seed's network and for the preset's (BatchNorm, 5x5 kernels), at any batch size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mnist_cnn.core.data import load_split
from mnist_cnn.core.model import Net, RawPixelClassifier
from mnist_cnn.core.onnx_engine import OnnxClassifier, export_onnx, onnx_threads


@pytest.mark.parametrize(
    "changes",
    [{}, {"batchnorm": True, "kernel_size": 5}],
    ids=["seed network", "preset: batchnorm, 5x5"],
)
def test_onnx_runtime_gives_torchs_probabilities(tmp_path, tiny_mirror, seed_params, changes):
    torch.manual_seed(0)
    net = Net(dataclasses.replace(seed_params.model, **changes)).eval()
    for module in net.modules():  # BatchNorm with statistics of its own, not the identity it starts as
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    classifier = RawPixelClassifier(net, "mnist").eval()
    onnx = OnnxClassifier(export_onnx(classifier, tmp_path / "model.onnx"))
    pixels = load_split(tiny_mirror, train=False).images.numpy().astype(np.float32)[:, None]
    for batch in (pixels[:1], pixels[:7], pixels):  # the batch axis is dynamic
        with torch.inference_mode():
            expected = classifier(torch.from_numpy(batch)).numpy()
        got = onnx(batch)
        assert got.shape == expected.shape == (len(batch), 10)
        assert np.abs(got - expected).max() < 1e-5
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_one_thread_unless_told(monkeypatch):
    monkeypatch.delenv("MNIST_CNN_ONNX_THREADS", raising=False)
    assert onnx_threads() == 1
    monkeypatch.setenv("MNIST_CNN_ONNX_THREADS", "2")
    assert onnx_threads() == 2
    monkeypatch.setenv("MNIST_CNN_ONNX_THREADS", "two")
    with pytest.raises(ValueError, match="MNIST_CNN_ONNX_THREADS='two': expected a whole number of threads >= 1"):
        onnx_threads()
