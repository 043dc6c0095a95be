"""What every benchmark shares: its options (where the data and params are, what to run on) and the
trainer set up on a chunk of the training split."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_cnn.core.data import Tensors, load_train_val
from mnist_cnn.core.inference import prepare_model
from mnist_cnn.core.model import Net
from mnist_cnn.core.optim import make_optimizer
from mnist_cnn.core.params import Params
from mnist_cnn.core.runtime import select_device, select_precision


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/raw"), help="the four IDX .gz files")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    return parser


@dataclass
class TrainerBench:
    """The project's trainer set up on the first ``batches`` batches of the training split."""

    device: torch.device
    precision: str
    epoch_samples: int  # the whole training split, to turn samples/s into seconds per epoch
    chunk: Tensors
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def trainer_bench(params: Params, data_dir: Path, batches: int) -> TrainerBench:
    cfg = params.train
    device = select_device(cfg.device)
    precision = select_precision(cfg.precision, device)
    train_data, _ = load_train_val(data_dir, params.data.dataset, cfg.val_split, cfg.seed, device)
    n = batches * cfg.batch_size
    net = prepare_model(Net(params.model), device)
    optimizer, _ = make_optimizer(net, cfg, batches)
    return TrainerBench(
        device=device,
        precision=precision,
        epoch_samples=len(train_data.y),
        chunk=Tensors(train_data.x[:n], train_data.y[:n]),
        net=net,
        optimizer=optimizer,
        generator=torch.Generator().manual_seed(0),
    )
