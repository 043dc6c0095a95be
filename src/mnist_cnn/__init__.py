"""mnist-cnn: an MLflow-tracked, DVC-reproducible PyTorch CNN on MNIST."""

__version__ = "0.1.0"
