"""Test accuracy of a preset's runs, mean ± std over seeds, with and without test-time augmentation.

Reads the runs tagged ``preset=NAME`` in the project's MLflow store, loads each run's registered model
(the same pyfunc that is served) and scores the real test set both ways; prints the README's rows.

    python benchmarks/preset_scores.py --preset augmented     # after the preset's dvc exp runs
"""

from __future__ import annotations

import dataclasses
import statistics

import torch
from mlflow.tracking import MlflowClient

from common import benchmark_parser
from mnist_cnn.core.data import load_split, normalise
from mnist_cnn.core.inference import loss_and_accuracy
from mnist_cnn.core.params import load_params
from mnist_cnn.core.runtime import select_precision
from mnist_cnn.stages.evaluate import score
from mnist_cnn.tracking import store
from presets import preset_runs, served_net


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--preset", default="augmented")
    args = parser.parse_args()
    params = load_params(args.params)
    store.configure()
    runs = preset_runs(MlflowClient(), params.mlflow.experiment, args.preset)
    test = load_split(args.data_dir, train=False)
    x, y = normalise(test.images, params.data.dataset), test.labels
    background = x.amin().item()
    precision = select_precision(args.precision, torch.device("cpu"))  # as evaluate scored: auto = bf16 on AVX512-BF16
    rows = []
    for run, version in runs:
        if version is None:
            raise SystemExit(f"error: run {run.info.run_name} ({args.preset}) has no registered version of its own")
        net = served_net(version)
        accuracies = {}
        for tta in (False, True):
            cfg = dataclasses.replace(params.evaluate, tta=tta)
            with torch.inference_mode():
                accuracies[tta] = loss_and_accuracy(score(net, x, cfg, precision, background), y)[1]
        seconds = float(run.data.metrics["train_seconds"])
        rows.append((int(run.data.params["train.seed"]), run.info.run_name, version.version, seconds, accuracies))
        print(
            f"seed {rows[-1][0]} ({run.info.run_name}, v{version.version}): {seconds:.0f} s training, "
            f"test {accuracies[False]:.2f}% | with TTA {accuracies[True]:.2f}% "
            f"| logged by evaluate {run.data.metrics['test_acc']:.2f}%"
        )
    for tta in (False, True):
        values = [r[4][tta] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"{'with' if tta else 'without'} TTA: mean {statistics.mean(values):.3f}% ± {spread:.3f} over {len(values)}"
        )


if __name__ == "__main__":
    main()
