"""The registered model: a pyfunc taking raw 28x28 grayscale pixels (0-255) and answering, per image, the
digit and the ten class probabilities.

``mlflow models serve`` and ``mlflow.pyfunc.load_model`` both run ``DigitClassifier.predict``. The
package's source is logged with the model (``code_paths``), so a version loads with the code it was
logged with, wherever it is served from.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from mnist_cnn.core.errors import ProjectError, masked, one_line
from mnist_cnn.core.model import IMAGE_SIZE, NUM_CLASSES, RawPixelClassifier, load_weights
from mnist_cnn.core.onnx_engine import OnnxClassifier, export_onnx
from mnist_cnn.core.params import ModelConfig
from mnist_cnn.core.payload import PIXELS, PNG_BASE64, UINT8_BASE64, BadInput, pixels_of
from mnist_cnn.core.runtime import memory_format
from mnist_cnn.tracking.store import configure, sqlite_path, tracking_uri

PROBABILITY_COLUMNS = [f"p{k}" for k in range(NUM_CLASSES)]


OUTPUT_COLUMNS = ["digit", "probability", *PROBABILITY_COLUMNS]


# The request's parameter ("params": {"preprocess": true}) that has photos of digits made MNIST-style.
PREPROCESS = "preprocess"


# Images per forward pass: 10,000 images at once would need about 1.3 GB for the first conv's output.
CHUNK = 500


WEIGHTS_ARTIFACT = "weights"
ONNX_ARTIFACT = "onnx"  # the same network for ONNX Runtime (versions registered before it have none)


# No input schema: MLflow's is either one tensor or named columns, never "an (N, 28, 28) array or a column of
# base64 strings", and an input schema would refuse one of the forms the model takes (core/payload.py). The
# model checks its input itself; the forms are listed in the version's metadata (INPUT_FORMS).
SIGNATURE = ModelSignature(
    inputs=None,
    outputs=Schema(
        [ColSpec("long", "digit"), ColSpec("float", "probability")]
        + [ColSpec("float", name) for name in PROBABILITY_COLUMNS]
    ),
    params=ParamSchema([ParamSpec(PREPROCESS, "boolean", False)]),
)


INPUT_FORMS = {
    PIXELS: "raw pixels 0-255: an (N, 28, 28) array, or a column of each image's 784 numbers",
    UINT8_BASE64: "one base64 string of N*784 bytes, each image's pixels row by row",
    PNG_BASE64: "a column of base64 PNG or JPEG images: 28x28 MNIST-style, or any photo with params.preprocess",
}


def _invalid(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE: the scoring server answers 400 with this message, not a 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def answer(probabilities: np.ndarray) -> pd.DataFrame:
    """One row per image: ``digit``, its ``probability``, and ``p0``..``p9``."""
    digits = probabilities.argmax(axis=1)
    probabilities = probabilities.astype(np.float32, copy=False)
    columns = {"digit": digits.astype(np.int64), "probability": probabilities[np.arange(len(digits)), digits]}
    columns.update(zip(PROBABILITY_COLUMNS, probabilities.T, strict=True))
    # Built in one go: inserting columns one by one cost 0.8 ms a request at batch 1, twice this.
    return pd.DataFrame(columns, copy=False)


# Set to "torch" to serve a version with torch although it carries the ONNX export.
ENGINE_ENV = "MNIST_CNN_ENGINE"


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """The CNN behind a pyfunc: the weights are an artifact (the state_dict of ``models/model.pt``), and
    so is their ONNX export; the architecture and the data set's normalisation are the constructor's
    arguments. On the CPU it answers through ONNX Runtime when the version carries the export."""

    def __init__(self, model: dict[str, Any], dataset: str) -> None:
        self.architecture = model
        self.dataset = dataset
        self.classifier: RawPixelClassifier | None = None
        self.onnx: OnnxClassifier | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        net = load_weights(ModelConfig(**self.architecture), Path(context.artifacts[WEIGHTS_ARTIFACT]))
        self.classifier = RawPixelClassifier(net.to(memory_format=memory_format(torch.device("cpu"))), self.dataset)
        exported = context.artifacts.get(ONNX_ARTIFACT)
        use_onnx = exported and os.environ.get(ENGINE_ENV, "onnx") != "torch"
        self.onnx = OnnxClassifier(Path(exported)) if use_onnx else None

    @property
    def engine(self) -> str:
        return "onnxruntime" if self.onnx is not None else "torch"

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> pd.DataFrame:
        try:
            pixels = pixels_of(model_input, preprocess=bool((params or {}).get(PREPROCESS, False)))
        except BadInput as exc:
            raise _invalid(str(exc)) from None
        pixels = pixels.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        chunks = [pixels[start : start + CHUNK] for start in range(0, len(pixels), CHUNK)]
        if self.onnx is not None:
            return answer(np.concatenate([self.onnx(chunk) for chunk in chunks]))
        fmt = memory_format(torch.device("cpu"))
        with torch.inference_mode():
            outputs = [self.classifier(torch.from_numpy(chunk).contiguous(memory_format=fmt)) for chunk in chunks]
        return answer(torch.cat(outputs).numpy())


def log_model(
    weights: Path, model_cfg: ModelConfig, dataset: str, example: np.ndarray, registered_model_name: str
) -> ModelInfo:
    """Log the pyfunc (the weights and their ONNX export) into the active run and register it as a new
    version of ``registered_model_name``."""
    with tempfile.TemporaryDirectory() as scratch:
        net = load_weights(model_cfg, weights)
        exported = export_onnx(RawPixelClassifier(net, dataset), Path(scratch) / "model.onnx")
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=DigitClassifier(dataclasses.asdict(model_cfg), dataset),
            artifacts={WEIGHTS_ARTIFACT: str(weights), ONNX_ARTIFACT: str(exported)},
            code_paths=[str(Path(__file__).resolve().parents[1])],  # the whole mnist_cnn package
            signature=SIGNATURE,
            input_example=example,
            metadata={"input_forms": INPUT_FORMS},
            registered_model_name=registered_model_name,
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"numpy=={np.__version__}",
                f"pandas=={pd.__version__}",
                f"pyyaml=={_version('pyyaml')}",
                f"onnxruntime=={_version('onnxruntime')}",
            ],
        )


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


# URIs that name a model through the tracking store; any other URI (a path, s3://...) is loaded as is.
STORE_SCHEMES = ("models:", "runs:")


class ModelError(ProjectError, RuntimeError):
    """The model URI names no model that loads, or a model that is not an mnist-cnn digit classifier."""


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model at ``model_uri``; errors name the URI and, for a registry URI, the store."""
    where = ""
    if model_uri.startswith(STORE_SCHEMES):
        uri = tracking_uri()
        store = sqlite_path(uri)
        # Opening a missing (or 0-byte) file would make an empty store of it.
        if store is not None and (not store.is_file() or store.stat().st_size == 0):
            empty = " (an empty file)" if store.is_file() else ""
            raise ModelError(
                f"{model_uri}: no MLflow store at {store}{empty}; "
                "run in the project directory or set MLFLOW_TRACKING_URI"
            )
        configure()
        where = f" (store {masked(uri)})"
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except ImportError as exc:  # s3://, gs://, wasbs:// need their cloud's client library
        raise ModelError(f"--model-uri {model_uri}{where}: {_missing_client(model_uri, exc)}") from None
    except (MlflowException, ValueError, OSError) as exc:
        raise ModelError(f"--model-uri {model_uri}{where}: {one_line(exc)}") from exc
    kind = _foreign_kind(model)
    if kind:
        raise ModelError(f"--model-uri {model_uri}: not an mnist-cnn model: {kind}")
    return model


# The package to install for a module MLflow's artifact repositories import (botocore: s3://, ...).
CLIENT_PACKAGES = {
    "botocore": "boto3",
    "boto3": "boto3",
    "google": "google-cloud-storage",
    "azure": "azure-storage-blob",
}


def _missing_client(model_uri: str, exc: ImportError) -> str:
    if not exc.name:
        return f"a library it needs is missing ({one_line(exc)})"
    module = exc.name
    package = CLIENT_PACKAGES.get(module.split(".")[0], module.split(".")[0])
    scheme = model_uri.split("://", 1)[0] + "://" if "://" in model_uri else "these"
    return f"{scheme} model URIs need {package} (no module named {module}): pip install {package}"


def _foreign_kind(model: mlflow.pyfunc.PyFuncModel) -> str | None:
    """What the model is when it is not the mnist-cnn pyfunc (``DigitClassifier``), or None."""
    flavors = model.metadata.flavors
    others = [name for name in flavors if name != mlflow.pyfunc.FLAVOR_NAME]
    if others:
        return f"its flavor is {others[0]}"
    loader = flavors.get(mlflow.pyfunc.FLAVOR_NAME, {}).get("loader_module")
    if loader != "mlflow.pyfunc.model":
        return f"its flavor is python_function with loader module {loader}"
    name = type(model.unwrap_python_model()).__name__
    return None if name == DigitClassifier.__name__ else f"its python model is a {name}, not a DigitClassifier"
