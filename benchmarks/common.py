"""Options every benchmark takes: where the data and params are, and what to run on."""

from __future__ import annotations

import argparse
from pathlib import Path


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/raw"), help="the four IDX .gz files")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    return parser
