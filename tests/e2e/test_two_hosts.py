"""Two hosts for real: two network namespaces joined by a veth pair, 192.0.2.1 and 192.0.2.2 (TEST-NET-1,
assigned only inside them). One torchrun per "host" (``--nnodes=2``, c10d rendezvous on host A), one
training: one MLflow run in the team's store, written by global rank 0; the same with host B killed
mid-training; and two tune workers, one per host, on one study in PostgreSQL on host A."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import make_project, the_runs, wait_for_line, write_tiny_params
from mnist_cnn.core.model import load_weights
from mnist_cnn.core.params import load_params
from tune_helpers import tune_runs, write_tune_params

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces (ip netns) need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="ip (iproute2) is not installed"),
]

PORT = 29500


@dataclass(frozen=True)
class Host:
    netns: str
    address: str
    device: str

    def run(self, command: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *command], **kwargs)

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(pid) for pid in listed.split()]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    """Host A and host B: two namespaces of our own (named after this process), joined by a veth pair.
    Whatever still runs in them at the end is ours (it runs in namespaces this fixture made) and is
    killed; deleting the namespaces deletes the link."""
    tag = str(os.getpid())[-6:]
    a, b = Host(f"mnist-a{tag}", "192.0.2.1", f"mna{tag}"), Host(f"mnist-b{tag}", "192.0.2.2", f"mnb{tag}")
    made = []
    try:
        for host in (a, b):
            ip("netns", "add", host.netns)
            made.append(host)
        ip("link", "add", a.device, "type", "veth", "peer", "name", b.device)
        for host in (a, b):
            ip("link", "set", host.device, "netns", host.netns)
            ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.device)
            ip("-n", host.netns, "link", "set", host.device, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for host in made:
            for pid in host.pids():
                os.kill(pid, signal.SIGKILL)
            ip("netns", "del", host.netns)


def torchrun(host: Host, project, store: str, rendezvous_host: bool) -> subprocess.Popen:
    """``python -m mnist_cnn train`` as node of a 2-node torchrun, as docs/ddp.md has it for two machines."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=2", "--nproc-per-node=1", "--max-restarts=0",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=192.0.2.1:{PORT}", f"--local-addr={host.address}",
        # Both namespaces have the machine's host name: torchrun would host the rendezvous store on neither.
        *(["--rdzv-conf=is_host=1"] if rendezvous_host else []),
        "-m", "mnist_cnn", "train", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store, "GLOO_SOCKET_IFNAME": host.device}
    return host.run(command, cwd=project.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def projects(tmp_path, tiny_mirror, **overrides):
    """Host A's and host B's own checkouts (data downloaded), the same params."""
    made = [make_project(tmp_path / name, tiny_mirror) for name in ("host-a", "host-b")]
    for project in made:
        write_tiny_params(project.params_file, **overrides)
    return made


def test_torchrun_across_two_hosts_makes_one_run_written_by_rank_0(hosts, tmp_path, tiny_mirror):
    a, b = hosts
    project_a, project_b = projects(tmp_path, tiny_mirror, **{"train.epochs": 2})
    store = f"sqlite:///{tmp_path / 'team.db'}"
    procs = [torchrun(a, project_a, store, True), torchrun(b, project_b, store, False)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(outputs)
    assert "rank 0 of 2 processes" in "".join(outputs) and "rank 1 of 2 processes" in "".join(outputs)

    os.environ["MLFLOW_TRACKING_URI"] = store
    (run,) = the_runs()
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    # Rank 0 wrote the weights on its own host; they load into the plain network.
    written = [p for p in (project_a, project_b) if (p.models / "model.pt").exists()]
    assert len(written) == 1
    load_weights(load_params(written[0].params_file).model, written[0].models / "model.pt")
    assert not a.pids() and not b.pids()


def test_host_b_killed_mid_training_ends_the_run_failed_on_host_a(hosts, tmp_path, tiny_mirror):
    a, b = hosts
    project_a, project_b = projects(tmp_path, tiny_mirror, **{"train.epochs": 500, "train.patience": 500})
    store = f"sqlite:///{tmp_path / 'team.db'}"
    on_a = torchrun(a, project_a, store, True)
    on_b = torchrun(b, project_b, store, False)
    wait_for_line(on_a, "epoch   1/")
    for pid in b.pids():  # the whole of host B: torchrun and its worker
        os.kill(pid, signal.SIGKILL)
    started = time.time()
    output, _ = on_a.communicate(timeout=180)
    on_b.communicate(timeout=60)
    assert on_a.returncode == 1, output
    assert time.time() - started < 120
    # The surviving worker says it in one line (torchrun's own failure report follows it: launched by hand,
    # torchrun is not the project's launcher, which reads that report for train.processes).
    assert "another rank of this training is gone" in output, output
    os.environ["MLFLOW_TRACKING_URI"] = store
    (run,) = the_runs()
    assert run.info.status == "FAILED", output
    assert not a.pids()
    assert not any((p.models / "model.pt").exists() for p in (project_a, project_b))


PG_PASSWORD = "optuna-password-for-tests"


def pg_bin(name: str) -> str:
    """PostgreSQL's program ``name``: on PATH, or the newest of Debian's versioned installs."""
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
    if found is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it with apt-get where it can)")
    return found


@pytest.fixture
def postgres_on_host_a(hosts):
    """The team's PostgreSQL on host A, listening on 192.0.2.1 only (inside host A's namespace), password
    logins from the 192.0.2.0/24 link; the database ``optuna``. Yields its SQLAlchemy URL."""
    a, _ = hosts
    home = Path(tempfile.mkdtemp(prefix="mnist-cnn-pg-"))
    home.chmod(0o755)
    pgdata, pwfile = home / "pgdata", home / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    for path in (home, pwfile):
        shutil.chown(path, "postgres", "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    initdb = [pg_bin("initdb"), "-D", str(pgdata), "-U", "optuna", "--auth=scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run([*as_postgres, *initdb], check=True, capture_output=True)
    with open(pgdata / "pg_hba.conf", "a") as hba:
        hba.write("host all all 192.0.2.0/24 scram-sha-256\n")
    options = ["-c", f"listen_addresses={a.address}", "-c", "port=5432", "-c", "unix_socket_directories="]
    server = a.run([*as_postgres, pg_bin("postgres"), "-D", str(pgdata), *options],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
    try:
        deadline = time.monotonic() + 60
        ready = [pg_bin("pg_isready"), "-h", a.address, "-p", "5432", "-U", "optuna"]
        while a.run(ready, env=env, stdout=subprocess.DEVNULL).wait() != 0:
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        created = a.run([pg_bin("createdb"), "-h", a.address, "-U", "optuna", "optuna"], env=env)
        assert created.wait(timeout=60) == 0
        yield f"postgresql+psycopg://optuna:{PG_PASSWORD}@{a.address}:5432/optuna"
    finally:
        server.send_signal(signal.SIGTERM)  # ours, started above (runuser passes SIGTERM on to postgres)
        try:
            server.wait(timeout=60)
        finally:  # the hosts fixture kills whatever is left in host A's namespace
            shutil.rmtree(home, ignore_errors=True)


def test_two_tune_workers_on_two_hosts_share_one_study_in_postgresql(hosts, postgres_on_host_a, tmp_path, tiny_mirror):
    a, b = hosts
    storage, n_trials = postgres_on_host_a, 4
    store = f"sqlite:///{tmp_path / 'team.db'}"
    roots = []
    for name in ("host-a", "host-b"):
        project = make_project(tmp_path / name, tiny_mirror)
        write_tune_params(project.params_file, n_trials=n_trials, epochs=1, pruner="none")
        roots.append(project.root)
    command = [sys.executable, "-m", "mnist_cnn", "tune", "--no-progress", "--tune.storage", storage]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store, "OMP_NUM_THREADS": "1"}
    workers = [host.run(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for host, root in zip((a, b), roots, strict=True)]  # fmt: skip
    outputs = [worker.communicate(timeout=400) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(out + err for out, err in outputs)

    ran = [re.search(r"ran trial\(s\) (\[.*\]|none)", out).group(1) for out, _ in outputs]
    numbers = [yaml.safe_load(r) if r != "none" else [] for r in ran]
    assert sorted(numbers[0] + numbers[1]) == list(range(n_trials)), ran  # every trial once
    assert len({re.search(r"parent run (\w+)", out).group(1) for out, _ in outputs}) == 1
    os.environ["MLFLOW_TRACKING_URI"] = store
    parents, children = tune_runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(n_trials))
    writers = [err.count("written to reports/best_params.yaml") for _, err in outputs]
    assert sorted(writers) == [0, 1], "the best params are written once, by the worker that finishes last"
    # The study itself, read on host A (only the namespaces reach 192.0.2.1).
    check = "import optuna, sys; s = optuna.load_study(study_name='mnist-cnn', storage=sys.argv[1]); "
    check += "print(sorted(t.number for t in s.trials), sorted({t.state.name for t in s.trials}))"
    reader = a.run([sys.executable, "-c", check, storage], stdout=subprocess.PIPE, text=True)
    assert reader.communicate(timeout=60)[0].strip() == f"{list(range(n_trials))} ['COMPLETE']"
