"""Real servers on 127.0.0.1 for the remote-shard tests: an HTTP server (Python's, with the faults a network makes)
and an S3-compatible one (moto's server, in its own process, checking credentials like AWS does)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator

import pytest


@dataclass
class Faults:
    """What the HTTP server does to a file's reads, by path (``/shard-000000.tar``).

    ``tail_pause_s``: a tar's bytes up to and including its end-of-archive block go out at once, the rest (the
    writer's padding) after this pause: a reader that closes its pipe at the end-of-archive block meets a writer
    still writing. ``fail``: how many of the next reads end halfway through the file (a dropped connection; the
    Content-Length promised the whole file). ``served``: reads started, by path."""

    tail_pause_s: float = 0.0
    fail: Dict[str, int] = field(default_factory=dict)
    served: Dict[str, int] = field(default_factory=dict)


def end_of_archive(data: bytes) -> int:
    """The offset just past a tar's first end-of-archive block."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        return tar.offset + 512


class _Handler(SimpleHTTPRequestHandler):
    faults: Faults

    def log_message(self, *args) -> None:  # the test output stays readable
        pass

    def copyfile(self, source, outputfile) -> None:
        data = source.read()
        path = self.path
        self.faults.served[path] = self.faults.served.get(path, 0) + 1
        if self.faults.fail.get(path, 0) > 0:
            self.faults.fail[path] -= 1
            outputfile.write(data[: len(data) // 2])
            outputfile.flush()
            self.close_connection = True
            return
        if self.faults.tail_pause_s and path.endswith(".tar"):
            end = end_of_archive(data)
            outputfile.write(data[:end])
            outputfile.flush()
            time.sleep(self.faults.tail_pause_s)  # the network's latency before the padding, not a synchronisation
            data = data[end:]
        outputfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that stops reading early (a reader leaving a shard, curl killed) is not the server's error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def http_server(root: Path, faults: Faults | None = None) -> Iterator[tuple[str, Faults]]:
    """Serve ``root`` at the URL given (``http://127.0.0.1:PORT``, the port bound by the server itself)."""
    faults = faults or Faults()
    handler = type("Handler", (_Handler,), {"faults": faults})
    server = _Server(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class S3:
    """A running S3-compatible server: its endpoint, valid credentials, and a client for setting up buckets."""

    endpoint: str
    key: str
    secret: str
    client: object

    def env(self, **overrides: str) -> Dict[str, str]:
        """The standard variables that point the AWS tools (and s3fs) at this server with these credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": "us-east-1", **overrides}

    def upload(self, directory: Path, bucket: str, prefix: str) -> None:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                self.client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


@contextlib.contextmanager
def s3_server(authenticate: bool = False) -> Iterator[S3]:
    """moto's S3 server in a process of its own on a port it binds. ``authenticate``: as AWS does, requests need
    valid credentials (three unsigned ones make an IAM user with full access and its key first); moto then also
    refuses a listing under a prefix with a '/' (a signature it computes wrongly), so only tests of credentials
    use it."""
    boto3 = pytest.importorskip("boto3")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3" if authenticate else "inf"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        endpoint = None
        for line in proc.stderr:  # werkzeug names the port it bound
            if "Running on http://" in line:
                endpoint = line.split("Running on ", 1)[1].split()[0]
                break
        assert endpoint, f"moto's server did not start (exit {proc.poll()})"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its log from filling the pipe
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="trainer")
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"], client)
    finally:
        proc.kill()
        proc.wait()


GCS_SERVER = """
import sys, time
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", 0, in_memory=True)
server.start()
print(server._api._httpd.server_address[1], flush=True)  # the port it bound
time.sleep(1e9)
"""


@dataclass
class GCS:
    """A running GCS emulator: the variables that point gcsfs at it, and a filesystem for setting up buckets."""

    env: Dict[str, str]
    fs: object

    def upload(self, directory: Path, bucket: str, prefix: str) -> None:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                self.fs.put_file(str(path), f"{bucket}/{prefix}/{path.name}")


@contextlib.contextmanager
def gcs_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[GCS]:
    """gcp-storage-emulator's server in a process of its own, on a port it binds; gcsfs reaches it through
    STORAGE_EMULATOR_HOST (set here through ``monkeypatch``), anonymously. gcsfs's newer client first asks the bucket
    type over gRPC, which the emulator lacks (a minute's timeout): the classic client is asked for."""
    gcsfs = pytest.importorskip("gcsfs")
    pytest.importorskip("gcp_storage_emulator")
    proc = subprocess.Popen([sys.executable, "-c", GCS_SERVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        port = proc.stdout.readline().strip()
        assert port, f"the GCS emulator did not start (exit {proc.poll()})"
        env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield GCS(env, gcsfs.core.GCSFileSystem(token="anon"))
    finally:
        proc.kill()
        proc.wait()
