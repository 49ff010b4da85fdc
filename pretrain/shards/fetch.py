"""Reads objects from s3:// and gs:// for the shard opener, through fsspec (s3fs, gcsfs), in a process of its own.

    python pretrain/shards/fetch.py cat URL   # the object's bytes to stdout
    python pretrain/shards/fetch.py ls URL    # the object URLs directly under a prefix, one a line
    python pretrain/shards/fetch.py put URL   # stdin becomes the object (data_prep index writes index.json so)

It runs as a command under the opener's stall guard (killed with everything it started when it stops sending), the
way ``curl`` runs for http(s). It is started as a script, not a module, and imports nothing of this project, so it
runs wherever the trainer runs, installed or not. Credentials and endpoints are found where the ecosystem's tools find
them (botocore's chain for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, AWS_ENDPOINT_URL for
S3-compatible stores; google-auth's for GCS: GOOGLE_APPLICATION_CREDENTIALS or gcloud's login); none is ever printed.

Exit status: 0 done; 3 the object or prefix does not exist; 1 anything else. A failure is one line on stderr, what
went wrong without the URL (its caller names the shard).
"""

from __future__ import annotations

import os
import sys

NOT_FOUND = 3
CHUNK = 1 << 20
BLOCK = 8 * CHUNK  # each ranged read of the object (fsspec's default, 50 MB, held per reader, is more than needed)
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs"}
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws, and AWS_ENDPOINT_URL for an "
          "S3-compatible store",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
}


def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def cat(url: str) -> None:
    fs, path = _filesystem(url)
    with fs.open(path, "rb", block_size=BLOCK) as source:
        while chunk := source.read(CHUNK):
            sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


def ls(url: str) -> None:
    fs, path = _filesystem(url)
    scheme = url.split("://", 1)[0]
    for entry in fs.ls(path.rstrip("/"), detail=True):
        if entry.get("type") == "file":
            print(f"{scheme}://{entry['name']}")


def put(url: str) -> None:
    fs, path = _filesystem(url)
    fs.pipe_file(path, sys.stdin.buffer.read())


def _explain(url: str, exc: BaseException) -> str:
    """One line saying what went wrong and what would fix it, with the library's own words (the caller names the
    URL)."""
    scheme = url.split("://", 1)[0]
    if isinstance(exc, ImportError):
        return (f"reading {scheme}:// needs {_PACKAGES.get(scheme, 'an fsspec backend')} "
                f"(pip install 'perceiver-pretrain[remote]'): {exc}")
    if isinstance(exc, PermissionError):
        return f"access denied ({exc}); check the credentials ({_CREDENTIALS.get(scheme, '')}) and permissions"
    name = type(exc).__name__
    if "Credential" in name:
        return f"no credentials ({exc}); set {_CREDENTIALS.get(scheme, 'them')}"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({exc})"
    return f"{name}: {exc}"


def main(argv: list[str]) -> int:
    commands = {"cat": cat, "ls": ls, "put": put}
    if len(argv) != 2 or argv[0] not in commands:
        print("usage: fetch.py cat|ls|put URL", file=sys.stderr)
        return 1
    command, url = argv
    try:
        commands[command](url)
    except BrokenPipeError:  # the reader stopped early: not a failure; nothing more to write at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 -- every failure becomes one line and an exit status
        print(_explain(url, exc), file=sys.stderr)
        return NOT_FOUND if isinstance(exc, FileNotFoundError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
