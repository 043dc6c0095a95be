"""How often `predict` on image files agrees with the model on the raw 28x28 test digits.

Writes the first N real MNIST test digits as PNG files the way people have them (4x larger with a smooth
bicubic resize, dark ink on white, RGB), runs them through `images.load_digit` (the preprocessing
`python -m mnist_cnn predict` uses) and compares the champion's digits with its digits on the raw images.

    python benchmarks/predict_agreement.py --count 2000           # needs data/raw and a champion
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from common import benchmark_parser
from mnist_cnn.core.data import load_split
from mnist_cnn.core.images import load_digit
from mnist_cnn.tracking import store


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--model-uri", default="models:/mnist-cnn@champion")
    args = parser.parse_args()
    store.configure()
    model = mlflow.pyfunc.load_model(args.model_uri)
    test = load_split(args.data_dir, train=False)
    raw = test.images[: args.count].numpy().astype(np.float32)
    labels = test.labels[: args.count].numpy()
    on_raw = model.predict(raw)["digit"].to_numpy()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, image in enumerate(test.images[: args.count].numpy()):
            big = Image.fromarray(255 - image).resize((112, 112), Image.Resampling.BICUBIC).convert("RGB")
            files.append(Path(tmp) / f"{i}.png")
            big.save(files[-1])
        prepared = np.stack([load_digit(path) for path in files]).astype(np.float32)
    on_files = model.predict(prepared)["digit"].to_numpy()
    agree = 100 * (on_files == on_raw).mean()
    print(f"{args.count} test digits as 112x112 RGB PNGs, black on white, bicubic:")
    print(f"  agreement with the raw 28x28 predictions: {agree:.2f}%")
    print(f"  accuracy: raw {100 * (on_raw == labels).mean():.2f}%, files {100 * (on_files == labels).mean():.2f}%")


if __name__ == "__main__":
    main()
