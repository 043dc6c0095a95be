"""A real S3 API on loopback for the tests: moto's server (``python -m moto.server``, the engine dvc-s3 and
MLflow test against) with IAM authentication on, so that a wrong key is refused as S3 refuses it."""

from __future__ import annotations

import contextlib
import json
import os
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
