"""MLflow: the only package that imports it. A refusal of the tracking server or the registry (a 403, an
unknown model version) is a message for the user, shown as one line like the project's own errors."""

from mlflow.exceptions import MlflowException

from mnist_cnn.core.errors import register_user_facing

register_user_facing(MlflowException)
