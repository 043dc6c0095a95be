"""How many test errors the preset lines share: their registered models alone, and averaged.

Loads the registered model of every finished run tagged with one of the given ``preset`` names (the
same pyfunc that is served), scores the real test set as evaluate does (on the CPU, with this
params.yaml's dataset and TTA setting), and prints each model's accuracy, the accuracy of all of them
averaged (probabilities), and how many test images most of them get wrong. If the average is no
better than the mean model, the lines differ in noise, not in what they learned: no variation of the
same recipe will lift the mean much.

    python benchmarks/shared_errors.py --preset augmented augmented-val10 augmented-shear10
"""

from __future__ import annotations

import statistics

import torch
from mlflow.tracking import MlflowClient

from common import benchmark_parser
from mnist_cnn.core.data import load_split, normalise
from mnist_cnn.core.params import load_params
from mnist_cnn.core.runtime import select_precision
from mnist_cnn.stages.evaluate import score
from mnist_cnn.tracking import store
from presets import preset_runs, served_net


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--preset", nargs="+", default=["augmented"], help="preset tags to pool")
    args = parser.parse_args()
    if args.device not in ("auto", "cpu"):
        raise SystemExit(f"error: --device {args.device}: this benchmark scores on the CPU only")
    params = load_params(args.params)
    store.configure()
    client = MlflowClient()
    test = load_split(args.data_dir, train=False)
    x, y = normalise(test.images, params.data.dataset), test.labels
    background = x.amin().item()
    precision = select_precision(args.precision, torch.device("cpu"))
    wrong, probability_sum, accuracies, scored = [], torch.zeros(len(y), 10), [], set()
    for preset in args.preset:
        for run, version in preset_runs(client, params.mlflow.experiment, preset):
            seed = run.data.params.get("train.seed", "?")
            if version is None:
                print(f"{preset} seed {seed} ({run.info.run_name}): skipped, no registered version of its own")
                continue
            if version.version in scored:
                continue
            scored.add(version.version)
            with torch.inference_mode():
                probabilities = score(served_net(version), x, params.evaluate, precision, background).float().exp()
            predicted = probabilities.argmax(1)
            wrong.append(predicted != y)
            probability_sum += probabilities
            accuracies.append(100.0 * (predicted == y).float().mean().item())
            print(f"{preset} seed {seed} (v{version.version}): {accuracies[-1]:.2f}%")
    if not accuracies:
        raise SystemExit(f"error: no registered runs tagged preset = {' | '.join(args.preset)}")
    errors = torch.stack(wrong).float().mean(0)
    averaged = 100.0 * (probability_sum.argmax(1) == y).float().mean().item()
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    print(f"{len(accuracies)} models: mean {statistics.mean(accuracies):.3f}% ± {spread:.3f}; averaged {averaged:.2f}%")
    print(
        f"test images wrong in every model: {int((errors == 1).sum())}, in at least half: "
        f"{int((errors >= 0.5).sum())}, in any: {int((errors > 0).sum())} (of {len(y):,})"
    )


if __name__ == "__main__":
    main()
