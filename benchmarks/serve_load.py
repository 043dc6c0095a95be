"""Load test of the served model: concurrent clients against ``mlflow models serve`` on loopback, each
configuration side by side in one run (all servers up, rounds alternating), then a soak.

Configurations: today's torch pyfunc with JSON pixels and one worker; ONNX Runtime with JSON; ONNX
Runtime with ``uint8_base64``; the same with two uvicorn workers. Each meets concurrency 1, 16 and 64 at
batch 1 and batch 1,000, bounded by ``--requests`` and ``--seconds`` per cell. Every answer is checked:
its row count, and at batch 1 that the digit is the one the model gives that image in process (a wrong
or foreign answer counts as an error). The server's memory is its process tree's resident set, sampled
every 0.2 s. The in-process torch throughput at batch 1,000 is measured in the same run. The soak runs
one configuration at concurrency 16 for ``--soak`` seconds: errors, and resident memory at its end
against its value after warm-up.

A tiny 1-epoch model of the default architecture (serve_speed.py's), so no real data is needed. Client
and servers share the machine's cores; loopback only.

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --rounds 1 --seconds 3 --soak 10      # a quick look
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from common import benchmark_parser
from mnist_cnn.core.data import load_split
from mnist_cnn.core.payload import uint8_base64
from mnist_cnn.ops.scoring import scoring_server
from serve_speed import CHAMPION, engine_env, load_with, train_tiny_champion


@dataclass(frozen=True)
class Config:
    name: str
    engine: str  # torch | onnxruntime
    form: str  # json | base64
    workers: int = 1


CONFIGS = (
    Config("torch, JSON, 1 worker (before)", "torch", "json"),
    Config("ONNX, JSON, 1 worker", "onnxruntime", "json"),
    Config("ONNX, base64, 1 worker", "onnxruntime", "base64"),
    Config("ONNX, base64, 2 workers", "onnxruntime", "base64", workers=2),
)


def body(images: np.ndarray, form: str) -> bytes:
    inputs = images.astype(np.uint8).tolist() if form == "json" else {"uint8_base64": uint8_base64(images)}
    return json.dumps({"inputs": inputs}).encode()


@dataclass
class Cell:
    """One configuration at one concurrency and batch size, over all rounds."""

    latencies: list[float] = field(default_factory=list)
    requests_per_s: list[float] = field(default_factory=list)
    errors: int = 0
    peak_rss: int = 0


async def load(
    url: str, bodies: list[bytes], expected: list[list[int]], concurrency: int, requests: int, seconds: float
) -> tuple[list[float], int, float]:
    """``concurrency`` clients sending ``bodies`` in turn until ``requests`` are sent or ``seconds`` pass;
    the latencies, the errors (not 200, or an answer that is not the body's), and the wall time."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent, errors
        while sent < requests and time.perf_counter() < deadline:
            i, sent = sent % len(bodies), sent + 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=bodies[i], headers=headers) as response:
                    payload = await response.read()
                    status = response.status
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            if status != 200 or [row["digit"] for row in json.loads(payload)["predictions"]] != expected[i]:
                errors += 1

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - start


def server_tree(url: str) -> list[psutil.Process]:
    """The processes listening on the server's port (uvicorn's workers share its socket) and their
    children: the server, proven by its socket rather than by a name or a pid we were told."""
    port = int(url.rsplit(":", 1)[1])
    owners = {c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"}
    tree: dict[int, psutil.Process] = {}
    for pid in owners:
        with contextlib.suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            for p in [process, *process.children(recursive=True)]:
                tree[p.pid] = p
    return list(tree.values())


def rss(tree: list[psutil.Process]) -> int:
    total = 0
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


class PeakMemory:
    """The largest resident set of a process tree while the block runs, sampled every 0.2 s."""

    def __init__(self, tree: list[psutil.Process]) -> None:
        self.tree, self.peak, self._stop = tree, rss(tree), threading.Event()

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss(self.tree))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def in_process_torch(batch: np.ndarray, repeats: int) -> float:
    model = load_with("torch")
    model.predict(batch)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(batch)
        rates.append(len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000, help="at most this many requests per cell")
    parser.add_argument("--seconds", type=float, default=8.0, help="at most this long per cell (then drain)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--soak", type=float, default=60.0, help="seconds of the soak (0: none)")
    parser.add_argument("--soak-config", default=CONFIGS[-1].name)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"{os.cpu_count()} CPUs | ONNX Runtime threads: {os.environ.get('MNIST_CNN_ONNX_THREADS', '1')}")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        train_tiny_champion(args.params.resolve(), root)
        pixels = load_split(root / "data" / "raw", train=False).images.numpy()
        reference = load_with("onnxruntime")
        singles = [pixels[i % len(pixels)][None] for i in range(64)]
        single_digits = [reference.predict(image.astype(np.float32))["digit"].tolist() for image in singles]
        big = np.resize(pixels, (1000, 28, 28))
        big_digits = reference.predict(big.astype(np.float32))["digit"].tolist()
        work = {  # batch -> (bodies per form, expected digits)
            1: ({form: [body(image, form) for image in singles] for form in ("json", "base64")}, single_digits),
            1000: ({form: [body(big, form)] for form in ("json", "base64")}, [big_digits]),
        }
        print(
            f"bodies: batch 1 {len(work[1][0]['json'][0]):,} B JSON, {len(work[1][0]['base64'][0]):,} B base64; "
            f"batch 1,000 {len(work[1000][0]['json'][0]):,} B JSON, {len(work[1000][0]['base64'][0]):,} B base64"
        )
        urls = {}
        for config in CONFIGS:
            log = root / f"server-{len(urls)}.log"
            url = stack.enter_context(
                scoring_server(CHAMPION, env=engine_env(config.engine), log=log, workers=config.workers)
            )
            urls[config.name] = f"{url}/invocations"
        trees = {config.name: server_tree(urls[config.name].rsplit("/", 1)[0]) for config in CONFIGS}
        for name, tree in trees.items():
            print(f"{name}: {len(tree)} server processes, {rss(tree) / 2**20:,.0f} MB resident before warm-up")
        for config in CONFIGS:  # warm-up: every worker's first calls
            for batch, (bodies, expected) in work.items():
                asyncio.run(load(urls[config.name], bodies[config.form], expected, 4, 8 if batch == 1 else 4, 30))

        cells: dict[tuple[str, int, int], Cell] = {}
        for round_ in range(args.rounds):
            for batch, (bodies, expected) in work.items():
                for concurrency in levels:
                    for config in CONFIGS:  # the configurations alternate within each cell's round
                        cell = cells.setdefault((config.name, batch, concurrency), Cell())
                        requests = args.requests if batch == 1 else max(concurrency, 16)
                        with PeakMemory(trees[config.name]) as memory:
                            lat, errors, wall = asyncio.run(
                                load(
                                    urls[config.name],
                                    bodies[config.form],
                                    expected,
                                    concurrency,
                                    requests,
                                    args.seconds,
                                )
                            )
                        cell.latencies += lat
                        cell.requests_per_s.append(len(lat) / wall)
                        cell.errors += errors
                        cell.peak_rss = max(cell.peak_rss, memory.peak)
            print(f"round {round_ + 1} of {args.rounds} done", flush=True)
        local = in_process_torch(big.astype(np.float32), 5)
        report(cells, levels, local)
        if args.soak:
            soak(urls[args.soak_config], trees[args.soak_config], work[1][0]["base64"], work[1][1], args)


def report(cells: dict[tuple[str, int, int], Cell], levels: list[int], local: float) -> None:
    before = CONFIGS[0].name
    print(
        "\n| configuration | batch | clients | requests/s | images/s | vs before | p50 ms | p99 ms | max ms "
        "| errors | peak RSS MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 1000):
        for concurrency in levels:
            base = statistics.median(cells[(before, batch, concurrency)].requests_per_s)
            for config in CONFIGS:
                cell = cells[(config.name, batch, concurrency)]
                rps = statistics.median(cell.requests_per_s)
                lat = cell.latencies
                print(
                    f"| {config.name} | {batch:,} | {concurrency} | {rps:,.1f} | {rps * batch:,.0f} | "
                    f"{rps / base:.2f}x | {1000 * percentile(lat, 50):.1f} | {1000 * percentile(lat, 99):.1f} | "
                    f"{1000 * max(lat, default=float('nan')):.1f} | {cell.errors} | {cell.peak_rss / 2**20:,.0f} |"
                )
    print(f"\nin process, torch, batch 1,000 (median of 5): {local:,.0f} images/s")
    for concurrency in levels:
        best = max(statistics.median(cells[(c.name, 1000, concurrency)].requests_per_s) * 1000 for c in CONFIGS)
        print(f"  best REST at batch 1,000, {concurrency} clients: {best:,.0f} images/s = {best / local:.0%} of it")


def soak(url: str, tree: list[psutil.Process], bodies: list[bytes], expected: list[list[int]], args) -> None:
    """Concurrency 16 at batch 1 for ``args.soak`` seconds, after a 10 s warm-up."""
    asyncio.run(load(url, bodies, expected, 16, 10**9, 10))
    settled = rss(tree)
    with PeakMemory(tree) as memory:
        lat, errors, wall = asyncio.run(load(url, bodies, expected, 16, 10**9, args.soak))
    end = rss(tree)
    print(
        f"\nsoak ({args.soak_config}, 16 clients, batch 1, {args.soak:.0f} s): {len(lat):,} requests, "
        f"{len(lat) / wall:,.0f}/s, p99 {1000 * percentile(lat, 99):.1f} ms, errors {errors}; resident memory "
        f"{settled / 2**20:,.0f} MB after warm-up, {end / 2**20:,.0f} MB at the end ({end / settled - 1:+.1%}), "
        f"peak {memory.peak / 2**20:,.0f} MB"
    )


if __name__ == "__main__":
    main()
