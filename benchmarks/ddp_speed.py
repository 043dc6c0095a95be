"""Training throughput with 1 process vs N data-parallel processes (torchrun), side by side.

Each round starts the workers afresh (1 process, then N through torchrun, alternating); every worker
runs the real ``train_epoch`` on its shard of the same batches, and rank 0 times it after a warm-up.
Threads are shared out so that the total stays the machine's core count.

    python benchmarks/ddp_speed.py                     # CPU: 1 vs 2 processes; needs data/raw
    python benchmarks/ddp_speed.py --processes 2 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import benchmark_parser
from mnist_cnn.core import distributed

RESULT = "samples/s="


def worker(args: argparse.Namespace) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from mnist_cnn.core.data import Tensors, load_train_val
    from mnist_cnn.core.epoch import train_epoch
    from mnist_cnn.core.inference import prepare_model
    from mnist_cnn.core.model import Net
    from mnist_cnn.core.optim import make_optimizer
    from mnist_cnn.core.params import load_params
    from mnist_cnn.core.runtime import select_device, select_precision

    world = distributed.from_env()
    params = load_params(args.params, {"train.device": args.device, "train.precision": args.precision})
    cfg = params.train
    device = distributed.device_for(world, select_device(cfg.device))
    precision = select_precision(cfg.precision, device)
    train_data, _ = load_train_val(args.data_dir, params.data.dataset, cfg.val_split, cfg.seed, device)
    n = args.batches * cfg.batch_size
    with distributed.process_group(world, device):
        net = prepare_model(Net(params.model), device)
        model = DistributedDataParallel(net) if world.distributed else net
        optimizer, _ = make_optimizer(net, cfg, args.batches)
        generator = torch.Generator().manual_seed(0)
        warm = Tensors(train_data.x[: 10 * cfg.batch_size], train_data.y[: 10 * cfg.batch_size])
        train_epoch(model, optimizer, warm, cfg, precision, generator, world=world)
        chunk = Tensors(train_data.x[:n], train_data.y[:n])
        start = time.perf_counter()
        train_epoch(model, optimizer, chunk, cfg, precision, generator, world=world)  # ends in an all-reduce
        seconds = time.perf_counter() - start
    if world.is_main:
        print(f"{RESULT}{n / seconds:.1f} threads={torch.get_num_threads()} device={device} precision={precision}")


def run_round(args: argparse.Namespace, processes: int) -> tuple[float, str]:
    script = [str(Path(__file__).resolve()), "--worker", *sys.argv[1:]]
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    if processes == 1:
        env["OMP_NUM_THREADS"] = str(cores)
        command = [sys.executable, *script]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, cores // processes))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command += script
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith(RESULT))
    rate, _, details = line.removeprefix(RESULT).partition(" ")
    return float(rate), details


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--processes", type=int, default=2, help="compared with 1 process")
    parser.add_argument("--batches", type=int, default=150, help="timed global batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rates: dict[int, list[float]] = {1: [], args.processes: []}
    for i in range(args.rounds):
        for processes in rates:
            rate, details = run_round(args, processes)
            rates[processes].append(rate)
            print(f"round {i + 1}: {processes} process(es) {rate:,.0f} samples/s ({details})", flush=True)
    one = statistics.median(rates[1])
    print(f"\n{os.cpu_count()} cores | torch {torch.__version__}")
    print("| processes | threads each | samples/s (median) | vs 1 process |")
    print("|---:|---:|---:|---:|")
    for processes, values in rates.items():
        threads = max(1, (os.cpu_count() or 1) // processes)
        median = statistics.median(values)
        print(f"| {processes} | {threads} | {median:,.0f} | {median / one:.2f}x |")


if __name__ == "__main__":
    main()
