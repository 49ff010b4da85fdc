"""Shards streamed from real servers on 127.0.0.1 (Python's HTTP server, moto's S3 server) as users point at them:
``http://`` and ``s3://`` URLs, brace patterns and prefixes, and ``pipe:curl``. No sample is lost on any path, a
dropped connection costs nothing, the streams equal the local ones, and what cannot be read is one clear line."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import webdataset as wds
from remote_servers import Faults, end_of_archive, gcs_server, http_server, s3_server
from test_data_shards import assert_batches_equal, data_config, multimodal_model, multimodal_sample, write_shards
from test_train_engine import launch, logs, losses, run, signal_all, tiny_config, wait, wait_for_step

from data_prep.__main__ import main as data_prep
from pretrain.data import DataError, DataStream, check_before_start
from pretrain.shards import SkipCounter, expand_spec, read_shard
from pretrain.train import EXIT_PREEMPTED

READS = 12
STEPS = 8


def shardwriter_shards(directory: Path, pattern: str = "sw-%06d.tar") -> list[Path]:
    """Shards of webdataset's ShardWriter (a pax header for every file, and its own padding; gzipped for a .gz
    pattern)."""
    directory.mkdir(parents=True)
    with wds.ShardWriter(str(directory / pattern), maxcount=7, verbose=0) as writer:
        for i in range(21):
            writer.write({**multimodal_sample(7, i), "__key__": f"sw-{i:04d}"})
    return sorted(p for p in directory.iterdir())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Our shards (data_prep's layout and index) and ShardWriter's, side by side, with paddings after the
    end-of-archive block from none to several KB; and ShardWriter's gzipped."""
    root = tmp_path_factory.mktemp("corpus")
    write_shards(root / "ours", [10, 13, 17, 9], multimodal_sample)
    shardwriter_shards(root / "theirs")
    shardwriter_shards(root / "gz", "sw-%06d.tar.gz")
    return root


def paddings(paths: list[Path]) -> list[int]:
    return [len(p.read_bytes()) - end_of_archive(p.read_bytes()) for p in paths]


def keys_read(url: str, counter: SkipCounter, retries: int = 0) -> list[str]:
    return [sample["__key__"] for sample in read_shard(url, counter, stall_timeout_s=30, retries=retries)]


def test_a_complete_shard_always_gives_all_its_samples_on_every_path(corpus):
    """The tail of each shard (its padding) arrives after a pause, as over a real network: a reader that left at the
    end-of-archive block closed curl's pipe first, curl failed writing ('exit 23') and the last sample was lost."""
    shards = sorted((corpus / "ours").glob("*.tar")) + sorted((corpus / "theirs").glob("*.tar"))
    assert min(paddings(shards)) <= 1024 and max(paddings(shards)) >= 4096  # both kinds of writer's padding
    shards += sorted((corpus / "gz").glob("*.tar.gz"))
    counter = SkipCounter()
    with http_server(corpus, Faults(tail_pause_s=0.02)) as (url, faults):
        for path in shards:
            expected = keys_read(str(path), counter)
            assert len(expected) == len(set(expected)) >= 7
            address = f"{url}/{path.relative_to(corpus)}"
            for _ in range(READS):
                assert keys_read(f"pipe:curl -sfL {address}", counter) == expected
                assert keys_read(address, counter) == expected  # an http:// URL: the same curl, under the guard
                assert keys_read(f"pipe:cat {path}", counter) == expected
    assert counter.total == {}
    assert set(faults.served.values()) == {2 * READS}


def test_a_dropped_connection_is_read_again_from_where_it_stopped(corpus, caplog):
    """The first two reads of a shard end halfway through (the connection drops): the third read goes on after the
    samples the first ones gave, so nothing is lost or doubled and the order is the one of an unbroken read."""
    path = corpus / "theirs" / "sw-000001.tar"
    with http_server(corpus, Faults(fail={"/theirs/sw-000001.tar": 2})) as (url, faults):
        counter = SkipCounter()
        assert keys_read(f"{url}/theirs/sw-000001.tar", counter, retries=3) == [f"sw-{i:04d}" for i in range(7, 14)]
        assert counter.total == {} and faults.served["/theirs/sw-000001.tar"] == 3
        assert "reading it again in 1 s (attempt 2 of 4)" in caplog.text and "curl: (18)" in caplog.text

        faults.fail["/theirs/sw-000001.tar"] = 10  # it never comes whole: the samples before the cut stay
        counter = SkipCounter()
        kept = keys_read(f"{url}/theirs/sw-000001.tar", counter, retries=1)
        assert 0 < len(kept) < 7 and kept == [f"sw-{i:04d}" for i in range(7, 7 + len(kept))]
        assert counter.total == {"corrupt_tar": 1} and "curl: (18)" in counter.first["corrupt_tar"]
    assert path.exists()


def test_streams_over_http_equal_the_local_ones_and_resume_exactly(corpus, tmp_path):
    with http_server(corpus, Faults(tail_pause_s=0.005)) as (url, _):
        local = str(corpus / "ours")
        remote = f"{url}/ours/shard-{{000000..000003}}.tar"
        assert [s.samples for s in expand_spec(remote, "k")] == [10, 13, 17, 9]  # the index beside them: counts
        cfg = dict(num_workers=2, batch_size=4, epoch_samples=32)
        expected = list(DataStream(data_config([local], **cfg), multimodal_model()))
        stream = DataStream(data_config([remote], **cfg), multimodal_model())
        got = list(stream)
        assert_batches_equal(got, expected)
        assert_batches_equal(list(stream), _second_epoch(local, cfg))
        halfway = DataStream(data_config([remote], **cfg), multimodal_model())
        first = list(zip(range(3), halfway))
        resumed = DataStream(data_config([remote], **cfg), multimodal_model())
        resumed.load_state_dict(halfway.state_dict())
        assert_batches_equal([b for _, b in first] + list(resumed), expected)

        # a directory of its own over http: its index.json lists the shards
        assert [(s.url, s.samples) for s in expand_spec(f"{url}/ours", "k")] == [
            (f"{url}/ours/shard-{i:06d}.tar", n) for i, n in enumerate([10, 13, 17, 9])]


def _second_epoch(spec: str, cfg: dict) -> list:
    stream = DataStream(data_config([spec], **cfg), multimodal_model())
    list(stream)
    return list(stream)


def test_index_and_validate_shards_on_a_web_server(corpus, tmp_path, capsys):
    with http_server(corpus) as (url, _):
        spec = f"{url}/theirs/sw-{{000000..000002}}.tar"
        assert data_prep(["index", spec]) == 2  # a web server cannot take the index
        assert "give --out DIR for their index" in capsys.readouterr().err
        assert data_prep(["index", spec, "--out", str(tmp_path / "idx"), "--workers", "2"]) == 0
        index = json.loads((tmp_path / "idx" / "index.json").read_text())
        sizes = [p.stat().st_size for p in sorted((corpus / "theirs").glob("*.tar"))]
        assert [(s["name"], s["samples"], s["bytes"]) for s in index["shards"]] == [
            (f"{url}/theirs/sw-{i:06d}.tar", 7, sizes[i]) for i in range(3)]
        assert data_prep(["validate", spec, "--workers", "2"]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"{spec}: checked 3 shards, 21 samples: no problems"
        stream = DataStream(data_config([str(tmp_path / "idx")], num_workers=1, batch_size=7, shuffle_buffer=0,
                                        streams=1),
                            multimodal_model())
        assert len(stream) == 3 and sorted(k for b in stream for k in b["keys"]) == [f"sw-{i:04d}" for i in range(21)]


def test_bad_addresses_are_one_line_naming_the_shard_before_start_and_skipped_during_the_run(corpus):
    with http_server(corpus) as (url, _):
        missing = f"{url}/ours/nothing-{{0..1}}.tar"
        for spec, cause in [(missing, "curl: (22) The requested URL returned error: 404"),
                            ("http://127.0.0.1:1/shard-{0..1}.tar", "curl: (7) Failed to connect to 127.0.0.1 port 1")]:
            cfg = data_config([spec], epoch_samples=8)
            with pytest.raises(DataError) as error:
                check_before_start(cfg, ["train"], world_size=1, global_batch=cfg.batch_size)
            first = spec.replace("{0..1}", "0")
            assert str(error.value).startswith(f"data.train_shards[0]: its first shard cannot be read: {first}: "
                                               f"{cause}")
            assert "\n" not in str(error.value)
        # one bad shard among good ones: skipped, counted, named in the log; the epoch completes
        spec = f"{url}/ours/shard-{{000000..000001}}.tar::{url}/ours/gone.tar"
        stream = DataStream(data_config([spec], num_workers=0, batch_size=4, epoch_samples=20),
                            multimodal_model())
        assert len(list(stream)) == 5 and set(stream.skipped()) == {"unreadable_shard"}  # once a pass over it


@pytest.fixture(scope="module")
def s3(corpus):
    with s3_server() as server:
        server.client.create_bucket(Bucket="corpus")
        server.upload(corpus / "ours", "corpus", "ours")
        server.upload(corpus / "theirs", "corpus", "theirs")
        server.upload(corpus / "gz", "corpus", "gz")
        yield server


def test_streams_from_s3_equal_the_local_ones(corpus, s3, monkeypatch):
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    cfg = dict(num_workers=0, batch_size=4, epoch_samples=32)
    expected = list(DataStream(data_config([str(corpus / "ours")], **cfg), multimodal_model()))
    for spec in ("s3://corpus/ours", "s3://corpus/ours/shard-{000000..000003}.tar"):  # a prefix and a pattern
        assert [s.samples for s in expand_spec(spec, "k")] == [10, 13, 17, 9]
        assert_batches_equal(list(DataStream(data_config([spec], **cfg), multimodal_model())), expected)
    cfg = dict(num_workers=0, batch_size=7, epoch_samples=21, shuffle_buffer=0)  # gzipped, listed (no index)
    assert_batches_equal(list(DataStream(data_config(["s3://corpus/gz"], **cfg), multimodal_model())),
                         list(DataStream(data_config([str(corpus / "gz")], **cfg), multimodal_model())))


def test_index_validate_and_stats_in_a_bucket(corpus, s3, monkeypatch, capsys):
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    assert data_prep(["stats", "s3://corpus/theirs", "--workers", "1"]) == 0  # no index: counted
    assert capsys.readouterr().out.startswith("s3://corpus/theirs: 3 shards, 21 samples, ")
    assert data_prep(["index", "s3://corpus/theirs", "--workers", "2"]) == 0  # into the prefix itself
    index = json.loads(s3.client.get_object(Bucket="corpus", Key="theirs/index.json")["Body"].read())
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [(f"sw-{i:06d}.tar", 7) for i in range(3)]
    assert [(s.url, s.samples) for s in expand_spec("s3://corpus/theirs", "k")] == [
        (f"s3://corpus/theirs/sw-{i:06d}.tar", 7) for i in range(3)]
    assert data_prep(["validate", "s3://corpus/theirs", "--workers", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "s3://corpus/theirs: checked 3 shards, 21 samples: no problems"


@pytest.fixture(scope="module")
def s3_with_keys(corpus):
    """A server that checks credentials, as AWS does."""
    with s3_server(authenticate=True) as server:
        server.client.create_bucket(Bucket="corpus")
        server.upload(corpus / "ours", "corpus", "ours")
        yield server


@pytest.mark.parametrize("server, env, spec, cause", [
    ("s3", {}, "s3://nobucket/shard-{0..1}.tar", "s3://nobucket/shard-0.tar: not found (The specified bucket does "
                                                 "not exist)"),
    ("s3", {}, "s3://corpus/ours/typo-{0..1}.tar", "s3://corpus/ours/typo-0.tar: not found (corpus/ours/typo-0.tar)"),
    ("s3_with_keys", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "s3://corpus/ours/shard-{000000..000001}.tar",
     "s3://corpus/ours/shard-000000.tar: access denied (Forbidden); check the credentials "
     "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws, and AWS_ENDPOINT_URL"),
    ("s3", {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}, "s3://corpus/ours/shard-{000000..000001}.tar",
     "s3://corpus/ours/shard-000000.tar: EndpointConnectionError: Could not connect to the endpoint URL"),
], ids=["missing bucket", "missing object", "wrong credentials", "unreachable endpoint"])
def test_s3_mistakes_are_one_line_naming_the_shard(request, monkeypatch, server, env, spec, cause):
    s3 = request.getfixturevalue(server)
    for name, value in s3.env(**env).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DataError) as error:
        check_before_start(data_config([spec], epoch_samples=8), ["train"], world_size=1, global_batch=4)
    assert str(error.value).startswith(f"data.train_shards[0]: its first shard cannot be read: {cause}")
    assert "\n" not in str(error.value) and s3.secret not in str(error.value)


def test_credentials_from_the_aws_config_files(s3_with_keys, monkeypatch, tmp_path):
    """The AWS tools' credentials file works as they read it (no key in the environment)."""
    s3 = s3_with_keys
    config = tmp_path / "aws"
    config.mkdir()
    (config / "credentials").write_text(f"[default]\naws_access_key_id = {s3.key}\n"
                                        f"aws_secret_access_key = {s3.secret}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(config / "credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    counter = SkipCounter()
    assert len(keys_read("s3://corpus/ours/shard-000000.tar", counter)) == 10 and counter.total == {}
    shutil.rmtree(config)
    assert keys_read("s3://corpus/ours/shard-000000.tar", counter) == []
    assert counter.total == {"unreadable_shard": 1} and "no credentials" in counter.first["unreadable_shard"]
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") is None


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["http", "s3"])
def test_training_streamed_from_a_server_resumes_exactly_and_keeps_no_credential(tmp_path, corpus, s3, monkeypatch,
                                                                                 scheme):
    """Two ranks train on shards streamed from the server, are stopped by SIGTERM, and resume: the losses are those
    of a run on the same shards on local disk, bit for bit; the S3 key appears nowhere the run wrote."""
    sections = dict(train={"max_steps": STEPS, "eval_every_steps": 0}, checkpoint={"every_steps": 0})
    reference = tiny_config(tmp_path / "local", data={"train_shards": [str(corpus / "ours")]}, **sections)
    run(reference)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    with http_server(corpus, Faults(tail_pause_s=0.005)) as (url, faults):
        spec = f"{url}/ours" if scheme == "http" else "s3://corpus/ours"
        config = tiny_config(tmp_path / "remote", data={"train_shards": [spec]}, **sections)
        run_dir = config.parent / "run"
        procs = launch(config)
        wait_for_step(run_dir, 3, procs)
        signal_all(procs, signal.SIGTERM)
        assert wait(procs) == [EXIT_PREEMPTED] * 2, logs(config.parent)
        run(config)
    assert bool(faults.served) == (scheme == "http")
    got, expected = losses(run_dir), losses(reference.parent / "run")
    assert sorted(got) == list(range(1, STEPS + 1)) and got == expected
    assert "resumed from" in logs(config.parent) and "skipped" not in logs(config.parent)
    secret = s3.secret.encode()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_streams_index_and_errors_on_google_cloud_storage(corpus, monkeypatch, capsys):
    """gs:// through gcsfs, against Google's storage API as an emulator serves it."""
    with gcs_server(monkeypatch) as gcs:
        gcs.fs.mkdir("corpus")
        gcs.upload(corpus / "ours", "corpus", "ours")
        gcs.upload(corpus / "theirs", "corpus", "theirs")
        cfg = dict(num_workers=0, batch_size=4, epoch_samples=32)
        expected = list(DataStream(data_config([str(corpus / "ours")], **cfg), multimodal_model()))
        assert_batches_equal(list(DataStream(data_config(["gs://corpus/ours"], **cfg), multimodal_model())), expected)
        assert data_prep(["index", "gs://corpus/theirs", "--workers", "1"]) == 0
        assert [(s.url, s.samples) for s in expand_spec("gs://corpus/theirs", "k")] == [
            (f"gs://corpus/theirs/sw-{i:06d}.tar", 7) for i in range(3)]
        capsys.readouterr()
        with pytest.raises(DataError, match=r"^data.train_shards\[0\]: its first shard cannot be read: "
                                            r"gs://nobucket/a-0.tar: not found \("):
            check_before_start(data_config(["gs://nobucket/a-{0..1}.tar"], epoch_samples=8), ["train"], 1, 4)
