"""The served network as ONNX, run by ONNX Runtime on the CPU: the same probabilities as torch (to
about 1e-7), faster per image at one thread, and without torch's per-call overhead.

The registered model carries both the weights and this export; the pyfunc (which serves on the CPU)
runs ONNX Runtime, and torch where the export is missing (versions registered before it existed) or
``MNIST_CNN_ENGINE=torch`` asks for it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from mnist_cnn.core.model import IMAGE_SIZE, RawPixelClassifier

# Intra-op threads per ONNX Runtime session: one by default, so that serving workers (or a load test's
# client) do not fight over the cores; more for a single process that has the machine to itself.
THREADS_ENV = "MNIST_CNN_ONNX_THREADS"
INPUT, OUTPUT = "pixels", "probabilities"
OPSET = 17


def export_onnx(classifier: RawPixelClassifier, path: Path) -> Path:
    """Write ``classifier`` (raw pixels in, probabilities out) as ONNX with a dynamic batch axis."""
    example = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)  # a batch of two: nothing may bake in a size of 1
    with warnings.catch_warnings():
        # The TorchScript-based exporter (dynamo=False) is deprecated in favour of torch.export's, which
        # needs onnxscript and takes seconds per export; this static CNN exports the same in 50 ms, and
        # the parity test holds either way.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            classifier.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
        )
    return path


def onnx_threads() -> int:
    value = os.environ.get(THREADS_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: expected a whole number of threads >= 1")
    return int(value)


class OnnxClassifier:
    """Raw pixels (N, 1, 28, 28) float32 -> probabilities (N, 10), through an ONNX Runtime session."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort  # only where the model is served or checked

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or onnx_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(pixels, dtype=np.float32)})[0]
