"""Shards in object storage and on web servers: ``http(s)://``, ``s3://`` and ``gs://`` URLs.

A shard is streamed by a command that the opener runs under its stall guard (``opener.py``): ``curl`` for http(s)
(what clusters have, and webdataset's own choice), ``fetch.py`` for s3:// and gs:// (fsspec with s3fs or gcsfs, which
find credentials and endpoints where the ecosystem's tools do). Small files (a remote ``index.json``) and listings
are read at start-up, with the stall timeout as their time limit. Nothing here reads, logs or stores a credential.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

HTTP_PREFIXES = ("http://", "https://")
REMOTE_PREFIXES = HTTP_PREFIXES + ("s3://", "gs://")
_FETCH = Path(__file__).with_name("fetch.py")
_NOT_FOUND = 3  # fetch.py's exit status for a missing object or prefix
_CURL_OPTIONS = "-fsSL --connect-timeout 30"


class RemoteError(OSError):
    """A remote file or listing could not be read; the message names the URL and the cause."""


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def stream_command(url: str) -> str:
    """The shell command whose output is the object's bytes."""
    if url.startswith(HTTP_PREFIXES):
        return f"curl {_CURL_OPTIONS} {shlex.quote(url)}"
    return _fetch_command("cat", url)


def join(directory: str, name: str) -> str:
    """``name`` (as an ``index.json`` lists it) in ``directory``: a URL or an absolute path stays as it is."""
    if "://" in name or name.startswith("/"):
        return name
    return f"{directory.rstrip('/')}/{name}"


def read_small(url: str, timeout_s: float) -> Optional[bytes]:
    """The content of a small remote file, None when it does not exist; raises :class:`RemoteError`."""
    if url.startswith(HTTP_PREFIXES):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s or None) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise RemoteError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteError(f"{url}: {getattr(exc, 'reason', exc)}") from None
    return _run_fetch("cat", url, timeout_s)


def list_objects(url: str, timeout_s: float) -> List[str]:
    """The URLs of the objects directly under the prefix ``url`` (s3:// and gs://; web servers cannot list)."""
    if url.startswith(HTTP_PREFIXES):
        raise RemoteError(f"{url}: a web server cannot list a directory")
    listed = _run_fetch("ls", url, timeout_s)
    if listed is None:
        raise RemoteError(f"{url}: no such bucket or prefix")
    return listed.decode().split()


def write_small(url: str, data: bytes, timeout_s: float) -> None:
    """Store a small file at an s3:// or gs:// URL; raises :class:`RemoteError`."""
    if url.startswith(HTTP_PREFIXES):
        raise RemoteError(f"{url}: cannot write to a web server; write to a local folder or an s3:// or gs:// prefix")
    if _run_fetch("put", url, timeout_s, data) is None:
        raise RemoteError(f"{url}: no such bucket")


def _fetch_args(command: str, url: str) -> List[str]:
    return [sys.executable, str(_FETCH), command, url]


def _fetch_command(command: str, url: str) -> str:
    return shlex.join(_fetch_args(command, url))


def _run_fetch(command: str, url: str, timeout_s: float, data: bytes = b"") -> Optional[bytes]:
    try:
        done = subprocess.run(_fetch_args(command, url), input=data, capture_output=True, timeout=timeout_s or None)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"{url}: no answer within {timeout_s:g} s (data.pipe_stall_timeout_s)") from None
    if done.returncode == _NOT_FOUND:
        return None
    if done.returncode:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise RemoteError(f"{url}: {lines[-1] if lines else f'{command} failed (exit {done.returncode})'}")
    return done.stdout
