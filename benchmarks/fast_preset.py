"""Time to 99.0% test accuracy with the `fast` preset: the seed architecture, trained for speed.

Trains with the real `train` function for each epoch budget in turn (one-cycle schedules depend on
the total, so each budget is its own run) and evaluates on the test set, until one reaches the target.

    python benchmarks/fast_preset.py                       # needs data/raw
    python benchmarks/fast_preset.py --epochs 1 2 3 --device cuda
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from common import benchmark_parser
from mnist_cnn.core.params import load_params
from mnist_cnn.stages.evaluate import evaluate
from mnist_cnn.stages.train import train

# The preset, as `dvc exp run -S` takes it (printed below for the README).
# Same layers as the seed; dropout off (one epoch leaves nothing to regularise, and no masks to draw).
FAST = {
    "train.batch_size": 64,
    "train.optimizer": "adamw",
    "train.lr": 0.003,
    "train.scheduler": "onecycle",
    "train.label_smoothing": 0.1,
    "model.dropout2": 0.0,
}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--target", type=float, default=99.0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change the preset")
    args = parser.parse_args()
    preset = {**FAST, **dict(item.split("=", 1) for item in args.set)}
    print("dvc exp run " + " ".join(f"-S {k}={v}" for k, v in preset.items()) + " -S train.epochs=N")
    print("| epochs | training s | s/epoch | val acc % | test acc % | test loss |")
    print("|---:|---:|---:|---:|---:|---:|")
    for epochs in args.epochs:
        overrides = {**preset, "train.epochs": epochs, "train.device": args.device, "train.precision": args.precision}
        params = load_params(args.params, overrides)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = train(params, args.data_dir, Path(tmp), Path(tmp), show_progress=False)
            seconds = time.perf_counter() - start
            _, scores = evaluate(params, args.data_dir, Path(tmp), Path(tmp))
        test, val = scores.metrics["test"], scores.metrics["val"]
        print(
            f"| {epochs} | {result.train_seconds:.1f} | {result.train_seconds / epochs:.1f} | {val['accuracy']:.2f} "
            f"| {test['accuracy']:.2f} | {test['loss']:.4f} |  ({result.device}, {result.precision}, "
            f"{seconds:.1f} s with data loading)",
            flush=True,
        )
        if test["accuracy"] >= args.target:
            print(f"reached {args.target}% test accuracy: {epochs} epoch(s), {result.train_seconds:.1f} s training")
            break
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
