"""Real servers for the cluster tests: an S3-protocol server (moto's server mode) on 127.0.0.1, started once
per test session, and a fresh bucket per test.

The server's request log is kept, so tests can count the requests a reader sends (``S3Server.requests``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray node of these tests stays on 127.0.0.1


@dataclass
class S3Server:
    endpoint: str
    log: Path
    env: dict[str, str]

    def requests(self) -> list[str]:
        """The request lines the server has logged so far (``"GET /bucket/key HTTP/1.1"``)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line.split('"')[1] for line in text.splitlines() if line.count('"') >= 2 and " HTTP/" in line]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "requests.log"
    fh = open(log, "w")  # noqa: SIM115 - the server writes to it until the session ends
    proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        from rldiag import storage

        storage._FILESYSTEMS.clear()  # filesystems made before the endpoint was set
        yield S3Server(endpoint, log, env)
    finally:
        proc.terminate()
        proc.wait(10)
        fh.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_run(bucket: str) -> str:
    """The URI of a run folder in a fresh bucket (nothing there yet)."""
    return f"s3://{bucket}/runs/exp1"


@pytest.fixture(scope="module")
def ray_cluster(s3_server: S3Server) -> Iterator[str]:
    """A two-node Ray cluster on this machine (every node on 127.0.0.1), connected; yields its address.

    The nodes inherit this process's environment: the S3 endpoint and credentials, and the repository on
    ``PYTHONPATH`` so that workers import this checkout of rldiag.
    """
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    root = str(Path(__file__).resolve().parents[2])
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + saved if saved else "")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
