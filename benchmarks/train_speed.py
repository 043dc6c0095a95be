"""Side-by-side training throughput: the pytorch/examples-style loop vs this project's trainer.

One process, one go, same model, data, batch size and device. Rounds alternate (reference, trainer,
reference, ...) so drift hits both alike; medians and their ratio are printed. A second part measures
what MLflow tracking and the progress bar cost per epoch (trainer with both on vs both off).

    python benchmarks/train_speed.py                   # needs data/raw (dvc repro, or the download stage)
    python benchmarks/train_speed.py --batches 100 --rounds 5 --device cuda
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from common import benchmark_parser, trainer_bench
from mnist_cnn.core.data import NORMALISATION, Tensors, load_split
from mnist_cnn.core.epoch import train_epoch
from mnist_cnn.core.loop import EpochStats
from mnist_cnn.core.params import load_params
from mnist_cnn.tracking import runs, store


class ReferenceNet(nn.Module):
    """The seed network exactly as pytorch/examples writes it (ReLU before pool, a Dropout(0.0) module)."""

    def __init__(self, h1: int = 48, h2: int = 48, h3: int = 112, d1: float = 0.0, d2: float = 0.17):
        super().__init__()
        self.conv1 = nn.Conv2d(1, h1, 3, 1)
        self.conv2 = nn.Conv2d(h1, h2, 3, 1)
        self.dropout1 = nn.Dropout(d1)
        self.dropout2 = nn.Dropout(d2)
        self.fc1 = nn.Linear(h2 * 12 * 12, h3)
        self.fc2 = nn.Linear(h3, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class PilMNIST(Dataset):
    """torchvision.datasets.MNIST's __getitem__: a PIL image per sample, then ToTensor and Normalize."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: str = "mnist"):
        mean, std = NORMALISATION[dataset]
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index].numpy(), mode="L")
        return self.transform(image), int(self.labels[index])


def reference_round(model, optimizer, loader_iter, device, batches: int) -> float:
    """pytorch/examples' train(): DataLoader batches, fp32, NCHW, a host sync per logged step."""
    model.train()
    samples = 0
    start = time.perf_counter()
    for _ in range(batches):
        data, target = next(loader_iter)
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        samples += len(target)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples / (time.perf_counter() - start)


def trainer_round(model, optimizer, data: Tensors, cfg, precision, generator, progress=None) -> float:
    start = time.perf_counter()
    train_epoch(model, optimizer, data, cfg, precision, generator, progress=progress)  # reads metrics once
    return len(data.y) / (time.perf_counter() - start)


def infinite(loader):
    while True:
        yield from loader


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml's train.batch_size")
    parser.add_argument("--batches", type=int, default=150, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    params = load_params(args.params)
    overrides = {"train.device": args.device, "train.precision": args.precision}
    if args.batch_size:
        overrides["train.batch_size"] = args.batch_size
    params = load_params(args.params, overrides)
    cfg = params.train
    bench = trainer_bench(params, args.data_dir, args.batches)
    device, precision, chunk, model, optimizer = bench.device, bench.precision, bench.chunk, bench.net, bench.optimizer
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "-"
    print(f"torch {torch.__version__} | device {device} ({gpu}) | {torch.get_num_threads()} threads | {cpu}")
    print(
        f"batch size {cfg.batch_size} | trainer precision {precision} | {args.batches} batches x {args.rounds} rounds"
    )

    split = load_split(args.data_dir, train=True)
    torch.manual_seed(0)
    ref_model = ReferenceNet().to(device)
    ref_opt = torch.optim.Adadelta(ref_model.parameters(), lr=cfg.lr)
    loader = DataLoader(
        PilMNIST(split.images, split.labels),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=1 if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda",
    )
    ref_iter = infinite(loader)

    reference_round(ref_model, ref_opt, ref_iter, device, 10)  # warm-up: allocator, kernels, workers
    trainer_round(
        model,
        optimizer,
        Tensors(chunk.x[: 10 * cfg.batch_size], chunk.y[: 10 * cfg.batch_size]),
        cfg,
        precision,
        bench.generator,
    )
    ref_rates, trainer_rates = [], []
    for i in range(args.rounds):
        ref_rates.append(reference_round(ref_model, ref_opt, ref_iter, device, args.batches))
        trainer_rates.append(trainer_round(model, optimizer, chunk, cfg, precision, bench.generator))
        print(f"round {i + 1}: reference {ref_rates[-1]:8.0f} samples/s | trainer {trainer_rates[-1]:8.0f} samples/s")
    ref, ours = statistics.median(ref_rates), statistics.median(trainer_rates)
    epoch = bench.epoch_samples
    print("\n| loop | samples/s (median) | s per 48k epoch | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| pytorch/examples-style (DataLoader, fp32, NCHW) | {ref:,.0f} | {epoch / ref:.1f} | 1.00x |")
    print(
        f"| mnist-cnn trainer ({precision}, tensors by index) | {ours:,.0f} | {epoch / ours:.1f} | {ours / ref:.2f}x |"
    )

    overhead(params, epoch / ours, -(-epoch // cfg.batch_size))


def overhead(params, epoch_seconds: float, steps_per_epoch: int, epochs: int = 20) -> None:
    """What MLflow tracking and the progress bar add to an epoch, measured directly.

    MLflow: per-epoch metrics logged asynchronously to a SQLite store, then flushed (so the
    background writes are inside the timing too). Progress: one tqdm bar of an epoch's batches.
    Differences between whole tracked and untracked epochs drown in this machine's noise (a few
    percent between identical rounds), so the two costs are timed on their own and set against
    the measured epoch time.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        with mlflow.start_run(experiment_id=store.experiment_id("bench", Path(tmp))):
            logger = runs.EpochLogger()
            logger.log_epoch(EpochStats(0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0))  # first call starts the logger thread
            mlflow.flush_async_logging()
            start = time.perf_counter()
            for epoch in range(1, epochs + 1):
                logger.log_epoch(EpochStats(epoch, 0.1, 99.0, 0.1, 99.0, params.train.lr, epoch_seconds))
            mlflow.flush_async_logging()
            tracking_s = (time.perf_counter() - start) / epochs
    start = time.perf_counter()
    for _ in range(epochs):
        with tqdm(total=steps_per_epoch, desc="epoch", leave=False, mininterval=0.1) as bar:
            for _ in range(steps_per_epoch):
                bar.update(1)
    progress_s = (time.perf_counter() - start) / epochs
    total = tracking_s + progress_s
    print(
        f"\nper epoch: MLflow {1000 * tracking_s:.1f} ms + progress bar {1000 * progress_s:.1f} ms "
        f"= {1000 * total:.1f} ms, {100 * total / epoch_seconds:.2f}% of a {epoch_seconds:.1f} s epoch"
    )


if __name__ == "__main__":
    main()
