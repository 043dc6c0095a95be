"""What batch augmentation (affine, elastic) and the weight average cost per epoch, side by side with the plain trainer.

One process, one go: rounds alternate (plain, augmented, augmented + EMA, + elastic, plain, ...) over the same
batches with the real ``train_epoch``; medians and ratios are printed.

    python benchmarks/augment_cost.py                  # needs data/raw
    python benchmarks/augment_cost.py --device cuda --batches 300
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common import benchmark_parser, trainer_bench
from mnist_cnn.core.augment import Distortions
from mnist_cnn.core.epoch import Augmentation, train_epoch
from mnist_cnn.core.params import load_params

# The augmented preset's settings (README: Accuracy presets), and the elastic warp tried beside them.
PRESET = {"shift": 2.0, "rotate": 10.0, "scale": 0.1, "ema_decay": 0.999, "elastic": 34.0, "sigma": 4.0}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batches", type=int, default=150, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    params = load_params(args.params, {"train.device": args.device, "train.precision": args.precision})
    params = dataclasses.replace(params, model=dataclasses.replace(params.model, batchnorm=True))
    cfg = params.train
    bench = trainer_bench(params, args.data_dir, args.batches)
    device, precision, chunk, net = bench.device, bench.precision, bench.chunk, bench.net
    n = len(chunk.y)
    distortions = Distortions(PRESET["shift"], PRESET["rotate"], PRESET["scale"])
    augmentation = Augmentation(distortions, torch.Generator(device=device).manual_seed(0), chunk.x.amin().item())
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(PRESET["ema_decay"]), use_buffers=True)
    elastic = Distortions(PRESET["shift"], PRESET["rotate"], PRESET["scale"], PRESET["elastic"], PRESET["sigma"])
    warped = Augmentation(elastic, torch.Generator(device=device).manual_seed(0), chunk.x.amin().item())
    variants = {
        "plain": {},
        "augmented": {"augmentation": augmentation},
        "augmented + EMA": {"augmentation": augmentation, "ema": ema},
        "augmented + elastic + EMA": {"augmentation": warped, "ema": ema},
    }

    def samples_per_second(extra: dict) -> float:
        start = time.perf_counter()
        train_epoch(net, bench.optimizer, chunk, cfg, precision, bench.generator, **extra)
        return n / (time.perf_counter() - start)

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__} | {device} | {precision} | {threads} threads | batch {cfg.batch_size}")
    for extra in variants.values():
        samples_per_second(extra)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.rounds):
        for name, extra in variants.items():
            rates[name].append(samples_per_second(extra))
        print(f"round {i + 1}: " + " | ".join(f"{name} {r[-1]:,.0f}" for name, r in rates.items()), flush=True)
    plain = statistics.median(rates["plain"])
    epoch = bench.epoch_samples
    print("\n| trainer | samples/s (median) | s per 48k epoch | time vs plain |")
    print("|---|---:|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {epoch / median:.1f} | {plain / median:.2f}x |")


if __name__ == "__main__":
    main()
