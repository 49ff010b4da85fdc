"""Samples/s of the full data stream over shards on local disk, on an HTTP server and on an S3-compatible server (both
on 127.0.0.1, in the same run), and of plain webdataset over the same HTTP URLs: what reading shards remotely costs.

Not a test. Generates demo-like shards (``data_bench.py``'s text-only and multimodal kinds), serves them with
Python's HTTP server and moto's S3 server (``tests/remote_servers.py``; moto comes with the dev extra) and reads one
epoch of each. Loopback has no network latency or bandwidth limit: the numbers show what the remote path itself costs
(a download process per shard, curl or fsspec, the pipe), on the same CPU as the readers.

    python bench/remote_bench.py [--samples 20000] [--shards 8] [--workers 1 2] [--repeat 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from data_bench import multimodal_sample, plain_rate, stream_rate, text_sample, write_shards  # noqa: E402
from remote_servers import http_server, s3_server  # noqa: E402


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000, help="text-only samples (multimodal: a quarter)")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3, http_server(Path(tmp)) as (http, _):
        os.environ.update(s3.env())
        s3.client.create_bucket(Bucket="bench")
        print(f"{'shards':<11} {'workers':>7} {'where':<6} {'stream/s':>9} {'vs local':>9} {'plain wds/s':>12}")
        for kind, make, samples in (("text-only", text_sample, args.samples),
                                    ("multimodal", multimodal_sample, args.samples // 4)):
            write_shards(Path(tmp) / kind, samples, make, args.shards)
            s3.upload(Path(tmp) / kind, "bench", kind)
            names = sorted(p.name for p in (Path(tmp) / kind).glob("*.tar"))
            specs = {"local": str(Path(tmp) / kind), "http": f"{http}/{kind}", "s3": f"s3://bench/{kind}"}
            stream_rate(specs["local"], kind, max(args.workers), args.batch_size)  # warm-up: imports, page cache
            for workers in args.workers:
                local = None
                for where, spec in specs.items():
                    rate = max(stream_rate(spec, kind, workers, args.batch_size) for _ in range(args.repeat))
                    local = local or rate
                    plain = ""
                    if where == "http":
                        urls = [f"{http}/{kind}/{name}" for name in names]
                        plain = f"{max(plain_rate(urls, workers, args.batch_size) for _ in range(args.repeat)):.0f}"
                    rows.append({"shards": kind, "workers": workers, "where": where, "stream": rate,
                                 "vs_local": rate / local, "plain_webdataset": float(plain) if plain else None})
                    print(f"{kind:<11} {workers:>7} {where:<6} {rate:>9.0f} {rate / local:>9.2f} {plain:>12}",
                          flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
