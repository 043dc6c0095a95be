"""The seed CNN, and the wrapper that serves it on raw pixels."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.core.data import NORMALISATION, DataError
from mnist_cnn.core.params import ModelConfig

IMAGE_SIZE = 28


NUM_CLASSES = 10


class Net(nn.Module):
    """Conv(1,h1,k) > ReLU > Conv(h1,h2,k) > max-pool 2 > ReLU > Dropout > Linear(h2*s*s,h3) > ReLU >
    Dropout > Linear(h3,10) > log-softmax, where k is 3 and the pooled side s is 12 in the seed's.

    With ``batchnorm``, a BatchNorm2d follows each convolution (a change the augmented presets make to
    the seed's layers). ``kernel_size`` 5 makes both convolutions 5x5 and ``dilation`` 2 spreads
    conv2's taps two pixels apart: each widens what one pooled feature sees (6x6 pixels in the seed's;
    10x10 with 5x5 kernels, 8x8 with dilation) while the layer widths stay the same. ``padding`` 1
    zero-pads each convolution's input by one pixel, whatever the kernel: with the seed's 3x3 kernels
    the maps stay 28x28 (pooled 14, so a border pixel falls in 6 of conv1's windows, not 3). s follows
    from all three (``test_train`` checks the combinations).

    Max-pool runs before the second ReLU: the two commute (ReLU is monotonic), so this is the seed's
    function, with a quarter of the ReLU work.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        k, pad = cfg.kernel_size, cfg.padding
        pooled = (IMAGE_SIZE + 4 * pad - (k - 1) - cfg.dilation * (k - 1)) // 2
        self.conv1 = nn.Conv2d(1, cfg.hidden_1, k, 1, padding=pad)
        self.conv2 = nn.Conv2d(cfg.hidden_1, cfg.hidden_2, k, 1, padding=pad, dilation=cfg.dilation)
        self.bn1 = nn.BatchNorm2d(cfg.hidden_1) if cfg.batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(cfg.hidden_2) if cfg.batchnorm else nn.Identity()
        # A Dropout(p=0) still draws a mask in training; Identity is the same function for free.
        self.dropout1 = nn.Dropout(cfg.dropout1) if cfg.dropout1 > 0 else nn.Identity()
        self.fc1 = nn.Linear(cfg.hidden_2 * pooled * pooled, cfg.hidden_3)
        self.dropout2 = nn.Dropout(cfg.dropout2) if cfg.dropout2 > 0 else nn.Identity()
        self.fc2 = nn.Linear(cfg.hidden_3, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        x = self.dropout1(x)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class RawPixelClassifier(nn.Module):
    """Served network: raw grayscale pixels (0-255), shape (N, 28, 28) or (N, 1, 28, 28) -> class
    probabilities (N, 10).

    Normalisation lives here so that callers of the registered model send pixels as they are.
    """

    def __init__(self, net: Net, dataset: str) -> None:
        super().__init__()
        self.net = net
        self.mean, self.std = NORMALISATION[dataset]  # plain floats: constants in the exported graph

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        x = (x / 255.0 - self.mean) / self.std
        return self.net(x).exp()


def load_weights(cfg: ModelConfig, path: Path, device: torch.device | str = "cpu") -> Net:
    """A ``Net`` with the state_dict saved at ``path`` (loaded with ``weights_only=True``)."""
    net = Net(cfg)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: trained weights not found (run the train stage first)") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; its texts suggest weights_only=False
        raise DataError(
            f"{path}: not a readable weights file ({type(exc).__name__}; corrupt or truncated); rerun the train stage"
        ) from None
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a state_dict of weights; rerun the train stage")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise DataError(f"{path}: weights do not fit the model in params.yaml ({first})") from None
    return net.to(device).eval()
