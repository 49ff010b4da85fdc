"""``shard``: a JSONL manifest (one sample a line, media paths relative to it) -> checked, shuffled shards."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Mapping

from tqdm import tqdm

from data_prep.chunking import chunk_key, split_text
from data_prep.index import ShardIndex
from data_prep.media import encode_json
from data_prep.parallel import worker_pool
from data_prep.schema import KEY_RE, KEY_RULE
from data_prep.shuffle import KeyedShuffle
from data_prep.split import ValSplit
from data_prep.writer import Job, Rejection, RejectionLog, ShardLimits, prepare_output, write_shards
from pretrain.modalities import REGISTRY, STORED
from pretrain.shard_format import META_FIELD, REJECTED_FILE, Rejected

CONTENT_FIELDS = tuple(STORED)  # a manifest line's fields: one per modality (pretrain.modalities), in its order
ALLOWED_FIELDS = ("key", *CONTENT_FIELDS, "meta")
_TYPES = {"key": str, **{name: unit.manifest_type for name, unit in STORED.items()}, "meta": dict}


@dataclass(frozen=True)
class ManifestRow:
    """One manifest sample; :meth:`fields` reads and decodes its media (in a worker: the slow part), each by its
    modality's unit. ``options``: what the units store by (``ShardOptions.prep``)."""

    row: dict[str, Any]
    base: Path
    options: Mapping[str, Any]
    base_name = "manifest's folder"

    @property
    def slow(self) -> bool:
        return any(not unit.manifest_inline for name, unit in STORED.items() if name in self.row)

    def fields(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for name, unit in STORED.items():
            if name in self.row:
                field, data = unit.store(self._content(name), str(self.row[name]), self.options)
                out[field] = data
        if "meta" in self.row:
            out[META_FIELD] = encode_json(self._meta())
        return out

    def text_pieces(self, chunk_bytes: int) -> list[ManifestRow] | None:
        """This sample as text samples of at most ``chunk_bytes`` bytes (:mod:`data_prep.chunking`) when its content
        is a longer text alone, its metadata in each; else ``None``. Reads a folder's files here (raises
        :class:`Rejected`): the pieces must exist before the shuffle, which spreads them."""
        if "text" not in self.row or set(self.row) - {"key", "text", "meta"}:
            return None
        _, text = REGISTRY["text"].store(self._content("text"), str(self.row["text"]), self.options)
        if len(text) <= chunk_bytes:
            return None
        meta = {"meta": self._meta()} if "meta" in self.row else {}
        return [ManifestRow({"text": piece.decode("utf-8"), **meta}, self.base, self.options)
                for piece in split_text(text, chunk_bytes)]

    def _content(self, name: str) -> bytes:
        """What modality ``name``'s unit stores: an inline value's bytes (text, a label), or its file's."""
        value = self.row[name]
        return str(value).encode("utf-8") if STORED[name].manifest_inline else self._read(name)

    def _meta(self) -> dict[str, Any]:
        return self.row["meta"]

    def _read(self, field: str) -> bytes:
        path = self.base / self.row[field]
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise Rejected(field, f"file not found: {path} (paths are relative to the {self.base_name})") from None
        except OSError as e:
            raise Rejected(field, f"cannot read {path} ({e.strerror})") from None


OTHER_FIELDS = ("reject", "meta", "ignore")


@dataclass(frozen=True)
class ManifestFormat:
    """How an existing corpus's lines map onto the schema: ``rename`` (source, schema field) pairs, such as a
    corpus's ``content`` as ``text``, and what becomes of the fields the schema lacks: ``reject`` the line (so that
    a typo like ``imgae`` is caught), keep them in ``meta``, or ``ignore`` them."""

    rename: tuple[tuple[str, str], ...] = ()
    other_fields: str = "reject"

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:
        for source, target in self.rename:
            if source in row:
                if target in row:
                    raise Rejected(target, f"has both {source!r} (renamed to {target!r}) and {target!r}")
                row[target] = row.pop(source)
        others = sorted(set(row) - set(ALLOWED_FIELDS))
        if not others:
            return row
        if self.other_fields == "reject":
            raise Rejected(others[0], f"unknown field {others[0]!r}; allowed: {', '.join(ALLOWED_FIELDS)} (--rename "
                                      "maps a field onto one of them; --other-fields meta or ignore takes the rest)")
        values = {name: row.pop(name) for name in others}
        if self.other_fields == "meta":
            meta = row.setdefault("meta", {})
            if not isinstance(meta, dict):
                raise Rejected("meta", f"must be dict to take the other fields, got {type(meta).__name__}")
            clash = sorted(set(meta) & set(values))
            if clash:
                raise Rejected("meta", f"{clash[0]!r} is both a field of the line and a key of its meta")
            meta.update(values)
        return row


def parse_row(line: bytes, fmt: ManifestFormat = ManifestFormat()) -> dict[str, Any]:
    """One manifest line as a checked dict; raises :class:`Rejected` naming the bad field."""
    try:
        row = json.loads(line)
    except ValueError as e:
        raise Rejected("line", f"not valid JSON ({e})") from None
    if not isinstance(row, dict):
        raise Rejected("line", f"must be a JSON object with fields {', '.join(ALLOWED_FIELDS)}")
    # A lone surrogate comes only from an escape, from UTF-8 bytes ED A0-BF (json reads them as such) or from UTF-16
    # or UTF-32 (an ASCII character there holds a zero byte); the full check is slow, so other lines skip it.
    if b"\\u" in line or b"\xed" in line or b"\0" in line:
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected("line", "holds a lone surrogate escape (like \\ud800) that is no Unicode text") from None
    row = fmt.apply(row)
    for name, value in row.items():
        wanted = _TYPES[name]
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise Rejected(name, f"must be {wanted.__name__}, got {type(value).__name__}")
    if not any(name in row for name in CONTENT_FIELDS):
        raise Rejected("line", f"has no content; give at least one of {', '.join(CONTENT_FIELDS)}")
    if "key" in row and not KEY_RE.match(row["key"]):
        raise Rejected("key", f"{row['key']!r} is not a valid key: use {KEY_RULE}")
    return row


def manifest_stem(path: Path) -> str:
    """The manifest's name without ``.gz`` and ``.jsonl``/``.json``: ``c4-00000.json.gz`` -> ``c4-00000``."""
    name = path.name.removesuffix(".gz")
    return name.removesuffix(".jsonl").removesuffix(".json") or name


class ManifestError(Exception):
    """The manifest cannot be read to its end (a truncated or corrupt ``.gz``); the message names it and the line."""


def _numbered_lines(lines: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    number = 0
    try:
        for number, line in enumerate(lines, 1):
            yield number, line
    except (OSError, EOFError) as e:  # gzip's BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise ManifestError(f"{path}: unreadable after line {number} ({e}); nothing was written") from None


def read_manifest(path: Path, options: Mapping[str, Any],
                  fmt: ManifestFormat = ManifestFormat()) -> Iterator[Job | Rejection]:
    """A job per good line and a rejection per unparsable or ill-typed one (blank lines are skipped), read as they
    come: a manifest is never held whole. Duplicate keys are left to :func:`shuffle_into_shards`. A manifest whose
    name ends in ``.gz`` is read through gzip (corpora often come as ``.jsonl.gz``)."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as lines:
        for number, line in _numbered_lines(lines, path):
            if not line.strip():
                continue
            origin = f"{path.name}:{number}"
            try:
                row = parse_row(line, fmt)
            except Rejected as e:
                yield Rejection(origin, None, e.field, e.reason)
                continue
            yield Job(row.get("key", f"{number:09d}"), origin, ManifestRow(row, path.parent, options))


@dataclass(frozen=True)
class ShardOptions:
    """How ``shard`` writes, whatever the samples come from; ``shuffle_buffer_bytes`` bounds the samples held in
    memory while shuffling (:mod:`data_prep.shuffle`)."""

    seed: int = 0
    limits: ShardLimits = ShardLimits()
    audio_rate: int = 16_000
    overwrite: bool = False
    text_chunk_bytes: int = 0
    shuffle_buffer_bytes: int = 512_000_000
    progress: bool = True  # progress bars where stderr is a terminal
    max_reject_fraction: float = 1.0  # more rejected leaves the output unfinished (no index.json), as no sample does
    split: ValSplit | None = None  # with --val-fraction: the side of the split this output takes
    unit_options: tuple[tuple[str, Any], ...] = ()  # the modalities' own options given (their prep_options)

    @property
    def prep(self) -> dict[str, Any]:
        """What the modalities' units store by: ``audio_rate`` and every unit's options, defaults filled in."""
        defaults = {name: default for unit in STORED.values() for name, (default, _) in unit.prep_options.items()}
        return {"audio_rate": self.audio_rate, **defaults, **dict(self.unit_options)}

    def recorded(self) -> dict[str, Any]:
        """The options that shape the samples, as ``index.json`` records them (the buffer changes nothing; a unit's
        option when given)."""
        split = {"split": self.split.name, "val_fraction": self.split.fraction} if self.split else {}
        return {"seed": self.seed, "audio_rate": self.audio_rate, "text_chunk_bytes": self.text_chunk_bytes, **split,
                **dict(self.unit_options)}


Settle = Callable[[list[Job]], list[Job | Rejection]]  # the jobs that share a key -> what gets written


def first_keeps_the_key(jobs: list[Job]) -> list[Job | Rejection]:
    """A manifest's keys are the user's: the first line with a key is written, the others are rejected."""
    return [jobs[0], *(Rejection(job.origin, job.key, "key", f"duplicate key {job.key!r}; keys must be unique")
                       for job in jobs[1:])]


def _pieces(job: Job, chunk_bytes: int) -> list[Job] | Rejection:
    try:
        pieces = job.payload.text_pieces(chunk_bytes) if chunk_bytes else None
    except Rejected as e:
        return Rejection(job.origin, job.key, e.field, e.reason)
    return [job] if pieces is None else [Job(chunk_key(job.key, i), job.origin, p) for i, p in enumerate(pieces)]


def shuffle_into_shards(items: Iterable[Job | Rejection], out: Path, options: ShardOptions, info: dict[str, Any],
                        pool: Executor | None = None, settle: Settle = first_keeps_the_key) -> ShardIndex:
    """Write the jobs of ``items`` (:class:`ManifestRow` payloads; those on ``options.split``'s side) as shards in an
    order shuffled by the seed, so that each shard mixes the sources, long texts in pieces; ``settle`` decides between
    jobs that share a key. Encoding runs in ``pool`` (``None``: this process)."""
    if options.split is not None:  # before the pieces: a document's pieces stay on its side
        items = options.split.items(items, options.seed)
    prepare_output(out, options.overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with KeyedShuffle[Job](options.seed, out, options.shuffle_buffer_bytes) as shuffle, \
                RejectionLog(out / REJECTED_FILE) as log:
            inputs = _read(items, shuffle, log, options)
            info = {"command": "shard", **info, **options.recorded(), "inputs": inputs}
            settled = (item for jobs in shuffle for item in settle(jobs))
            return write_shards(out, settled, total=len(shuffle), limits=options.limits, pool=pool, info=info,
                                rejections=log, progress=options.progress,
                                max_reject_fraction=options.max_reject_fraction)
    except ManifestError:  # cut off: nothing is written
        (out / REJECTED_FILE).unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise


def _read(items: Iterable[Job | Rejection], shuffle: KeyedShuffle[Job], log: RejectionLog,
          options: ShardOptions) -> int:
    """Jobs (long texts in pieces) into ``shuffle``, rejections into ``log``; returns the number of items."""
    inputs, chunk_bytes = 0, options.text_chunk_bytes
    for item in tqdm(items, desc="read", unit=" inputs", disable=None if options.progress else True):
        inputs += 1
        result = item if isinstance(item, Rejection) else _pieces(item, chunk_bytes)
        if isinstance(result, Rejection):
            log.add(result)
        else:
            for job in result:
                shuffle.add(job.key, job)
    return inputs


def manifest_info(manifest: Path, fmt: ManifestFormat) -> dict[str, Any]:
    """What ``index.json`` records of the manifest and how its lines were read (its size: a changed file shows)."""
    return {"manifest": manifest.name, "manifest_bytes": manifest.stat().st_size, "rename": dict(fmt.rename),
            "other_fields": fmt.other_fields}


def shard_manifest(manifest: Path, out: Path, options: ShardOptions = ShardOptions(),
                   fmt: ManifestFormat = ManifestFormat(), pool: Executor | None = None) -> ShardIndex:
    """The manifest's samples as shards."""
    items = read_manifest(manifest, options.prep, fmt)
    return shuffle_into_shards(items, out, options, manifest_info(manifest, fmt), pool)


def _shard_one(manifest: Path, out: Path, options: ShardOptions, fmt: ManifestFormat,
               pool: Executor | None) -> ShardIndex | ManifestError:
    """The manifest's index, or its ``ManifestError`` (a manifest cut off), returned: the other files still go on."""
    try:
        return shard_manifest(manifest, out, options, fmt, pool)
    except ManifestError as e:
        return e


def _shard_file(manifest: Path, out: Path, options: ShardOptions, fmt: ManifestFormat,
                workers: int) -> ShardIndex | ManifestError:
    """One manifest in a process of its own, with ``workers`` more for its media."""
    with worker_pool(workers) as pool:
        return _shard_one(manifest, out, options, fmt, pool)


ManifestOutput = tuple[Path, Path, ShardOptions]  # a manifest, its output directory, how it is written


def shard_manifests(todo: list[ManifestOutput], fmt: ManifestFormat,
                    workers: int) -> Iterator[tuple[Path, ShardIndex | ManifestError]]:
    """Each (manifest, output, options) of ``todo`` sharded, yielded as (output, index or the ``ManifestError`` of a
    manifest cut off) as each ends. With ``workers`` > 1 and several outputs, up to ``workers`` are written side by
    side, each with its share of the workers and of the shuffle buffer: a text corpus of many files (whose samples are
    encoded where they are written, not in workers) then uses every core. The outputs are the same either way."""
    files = min(workers, len(todo))
    if files <= 1:
        with worker_pool(workers if todo else 1) as pool:  # started once for every manifest
            for manifest, out, options in todo:
                yield out, _shard_one(manifest, out, options, fmt, pool)
        return

    def share(options: ShardOptions) -> ShardOptions:  # of the shuffle buffer; the bar below shows the progress
        return replace(options, shuffle_buffer_bytes=options.shuffle_buffer_bytes // files, progress=False)

    with worker_pool(files) as pool, tqdm(total=len(todo), desc="shard", unit=" files", disable=None) as bar:
        futures = {pool.submit(_shard_file, manifest, out, share(options), fmt, workers // files): out
                   for manifest, out, options in todo}
        try:
            for future in as_completed(futures):
                bar.update()
                yield futures[future], future.result()
        except BaseException:  # a failure (or an interrupt) stops the files not yet begun
            pool.shutdown(wait=False, cancel_futures=True)
            raise
