"""Serving speed: the registered pyfunc through MLflow's REST scoring server on loopback vs called in-process,
each with its torch path and its ONNX Runtime path (two servers, ``MNIST_CNN_ENGINE``).

Trains a 1-epoch model of the default architecture (params.yaml's model section) on the test suite's
tiny data (scikit-learn's digits as MNIST files: no real data needed), registers it as the pipeline
does, serves it with ``mlflow models serve --env-manager local``, and measures, side by side in one
run, rounds alternating (REST, in-process, REST, ...) so drift hits both alike:

- batch 1: requests per second and p50/p99 latency, one image per request, one request at a time;
- batch 1,000: images per second.

Request bodies are encoded before timing (a client's JSON encoding is not the server's cost); the
server parses them as it would any request. Client and server share the machine's cores.

    python benchmarks/serve_speed.py
    python benchmarks/serve_speed.py --requests 500 --big-requests 10 --rounds 7
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny data set's writer

from common import benchmark_parser  # noqa: E402
from mnist_cnn.core import files
from mnist_cnn.core.data import load_split
from mnist_cnn.core.params import load_params
from mnist_cnn.ops.scoring import scoring_server
from mnist_cnn.stages import evaluate, train
from tinydata import write_checksums, write_tiny_mnist  # noqa: E402

CHAMPION = "models:/mnist-cnn@champion"


def train_tiny_champion(params_file: Path, root: Path) -> None:
    """One epoch on the tiny data, evaluated and registered into a store under ``root``."""
    data = root / "data" / "raw"
    write_checksums(write_tiny_mnist(data), root / "md5s.json")
    os.environ["MNIST_MD5S"] = str(root / "md5s.json")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    overrides = {"train.epochs": 1, "train.device": "cpu", "train.precision": "fp32", "train.resume": "never"}
    params = load_params(params_file, overrides)
    paths = files.Paths(root=root, params_file=params_file)
    train.run_train(params, paths, show_progress=False)
    evaluate.run_evaluate(params, paths)
    print(f"model: hidden {params.model.hidden_1}/{params.model.hidden_2}/{params.model.hidden_3}, 1 epoch, tiny data")


def rest_batch1(session: requests.Session, url: str, bodies: list[bytes]) -> list[float]:
    latencies = []
    for body in bodies:
        start = time.perf_counter()
        response = session.post(url, data=body, headers={"Content-Type": "application/json"})
        latencies.append(time.perf_counter() - start)
        response.raise_for_status()
    return latencies


def local_batch1(model, images: list[np.ndarray]) -> list[float]:
    latencies = []
    for image in images:
        start = time.perf_counter()
        model.predict(image)
        latencies.append(time.perf_counter() - start)
    return latencies


def rest_big(session: requests.Session, url: str, body: bytes, n: int, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        response = session.post(url, data=body, headers={"Content-Type": "application/json"})
        response.raise_for_status()
        assert len(response.json()["predictions"]) == n
    return n * repeats / (time.perf_counter() - start)


def local_big(model, batch: np.ndarray, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        model.predict(batch)
    return len(batch) * repeats / (time.perf_counter() - start)


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


ENGINES = ("torch", "onnxruntime")  # the pyfunc's two paths; MNIST_CNN_ENGINE=torch picks the first


def engine_env(engine: str) -> dict[str, str]:
    return {**os.environ, "MNIST_CNN_ENGINE": "torch" if engine == "torch" else "onnx"}


def load_with(engine: str):
    os.environ["MNIST_CNN_ENGINE"] = engine_env(engine)["MNIST_CNN_ENGINE"]
    model = mlflow.pyfunc.load_model(CHAMPION)
    assert model.unwrap_python_model().engine == engine, engine
    return model


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--requests", type=int, default=300, help="batch-1 requests per round")
    parser.add_argument("--big-batch", type=int, default=1000, help="images per request in the second part")
    parser.add_argument("--big-requests", type=int, default=5, help="big requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads, in-process and server (0: torch's own)")
    args = parser.parse_args()
    if args.threads:
        # The server reads it when torch starts; in-process, set_num_threads does the same.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__} | mlflow {mlflow.__version__} | {os.cpu_count()} CPUs | {cpu} | "
        f"{torch.get_num_threads()} torch threads | "
        f"ONNX Runtime threads: {os.environ.get('MNIST_CNN_ONNX_THREADS', '1')}"
    )

    columns = [f"{where} {engine}" for engine in ENGINES for where in ("REST", "in-process")]
    lat = {c: [] for c in columns}
    rps = {c: [] for c in columns}
    ips = {c: [] for c in columns}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        train_tiny_champion(args.params.resolve(), root)
        models = {engine: load_with(engine) for engine in ENGINES}
        pixels = load_split(root / "data" / "raw", train=False).images.numpy().astype(np.float32)
        singles = [pixels[i % len(pixels)][None] for i in range(args.requests)]
        single_bodies = [json.dumps({"inputs": image.astype(np.uint8).tolist()}).encode() for image in singles]
        batch = np.resize(pixels, (args.big_batch, 28, 28))
        big_body = json.dumps({"inputs": batch.astype(np.uint8).tolist()}).encode()
        print(f"bodies: {len(single_bodies[0]):,} bytes per image, {len(big_body):,} bytes per {args.big_batch}")
        urls = {}
        for engine in ENGINES:  # one server per engine, both up for the whole run
            log = root / f"scoring-server-{engine}.log"
            base = stack.enter_context(scoring_server(CHAMPION, env=engine_env(engine), log=log))
            urls[engine] = f"{base}/invocations"
        session = stack.enter_context(requests.Session())
        for engine in ENGINES:  # warm-up: connections, first-call allocations
            rest_batch1(session, urls[engine], single_bodies[:20])
            local_batch1(models[engine], singles[:20])
            rest_big(session, urls[engine], big_body, args.big_batch, 1)
            local_big(models[engine], batch, 1)
        for i in range(args.rounds):  # the columns alternate within each round, so drift hits all alike
            for engine in ENGINES:
                for where, column in (("REST", f"REST {engine}"), ("in-process", f"in-process {engine}")):
                    if where == "REST":
                        times = rest_batch1(session, urls[engine], single_bodies)
                        ips[column].append(rest_big(session, urls[engine], big_body, args.big_batch, args.big_requests))
                    else:
                        times = local_batch1(models[engine], singles)
                        ips[column].append(local_big(models[engine], batch, args.big_requests))
                    lat[column] += times
                    rps[column].append(len(times) / sum(times))
            print(
                f"round {i + 1}: "
                + " | ".join(f"{c} {rps[c][-1]:6.0f} req/s {ips[c][-1]:6.0f} img/s" for c in columns),
                flush=True,
            )

    def p(values: list[float], q: float) -> float:
        return float(np.percentile(values, q))

    n = args.rounds * args.requests
    print(f"\n{args.rounds} rounds; batch 1: {n} requests per column; latency percentiles over all of them")
    print("\n| | " + " | ".join(columns) + " | REST: ONNX / torch |")
    print("|---|" + "---:|" * (len(columns) + 1))
    rr = {c: statistics.median(rps[c]) for c in columns}
    ii = {c: statistics.median(ips[c]) for c in columns}
    ratio_r = rr["REST onnxruntime"] / rr["REST torch"]
    ratio_i = ii["REST onnxruntime"] / ii["REST torch"]
    print(
        "| batch 1: requests/s (median of rounds) | "
        + " | ".join(f"{rr[c]:,.0f}" for c in columns)
        + f" | {ratio_r:.2f}x |"
    )
    print("| batch 1: p50 latency, ms | " + " | ".join(ms(p(lat[c], 50)) for c in columns) + " | |")
    print("| batch 1: p99 latency, ms | " + " | ".join(ms(p(lat[c], 99)) for c in columns) + " | |")
    print(
        f"| batch {args.big_batch:,}: images/s (median of rounds) | "
        + " | ".join(f"{ii[c]:,.0f}" for c in columns)
        + f" | {ratio_i:.2f}x |"
    )


if __name__ == "__main__":
    main()
