"""The ``data_prep`` command line: ``shard``, ``index``, ``build-demo``, ``validate``, ``stats``.

Exit codes: 0 done; 1 the data is bad (too many rejects, problems found, nothing to build or index, a manifest cut
off); 2 the command cannot run as asked (bad arguments, a non-empty output without ``--overwrite``, a missing
manifest or index, shards that cannot be found).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_prep.chunking import MIN_CHUNK_BYTES
from data_prep.demo import SIZES, DemoSources, build_demo
from data_prep.existing import index_shards
from data_prep.folder import SUFFIX_FIELD, describe_passed_over, shard_folder
from data_prep.index import IndexFileError, ShardIndex, read_index
from data_prep.manifest import (
    ALLOWED_FIELDS,
    OTHER_FIELDS,
    ManifestError,
    ManifestFormat,
    ShardOptions,
    manifest_info,
    manifest_stem,
    shard_manifests,
)
from data_prep.parallel import worker_pool
from data_prep.split import SPLITS, ValSplit
from data_prep.sources import FASHION_DIR, INSTALL_SCRIPT, default_npm_cache
from data_prep.stats import human_bytes, stats
from data_prep.validate import validate
from data_prep.writer import OutputError, ShardLimits, prepare_output
from pretrain.modalities import STORED
from pretrain.shard_format import INDEX_FILE, REJECTED_FILE, is_shard_name
from pretrain.shards import DataError
from pretrain.shards.remote import join

MAX_PROBLEMS_SHOWN = 100
MAX_REASONS_SHOWN = 3  # fields whose rejections the summary shows, the most frequent first


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _bounded(cast: Callable[[str], float], low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: ``cast`` the text and require ``low <= value <= high``."""
    def parse(text: str) -> float:
        value = cast(text)
        if not low <= value <= high:
            bounds = f"at least {low}" if high == math.inf else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


def _renaming(text: str) -> tuple[str, str]:
    """``SOURCE=FIELD`` for ``--rename``: FIELD must be a manifest field."""
    source, _, target = text.partition("=")
    if not source or source == target or target not in ALLOWED_FIELDS:
        raise argparse.ArgumentTypeError(f"{text!r}: give SOURCE=FIELD with FIELD one of {', '.join(ALLOWED_FIELDS)}")
    return source, target


def _chunk_bytes(text: str) -> int:
    value = int(text)
    if value and value < MIN_CHUNK_BYTES:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or at least {MIN_CHUNK_BYTES}, got {text}")
    return value


_fraction = _bounded(float, 0.0, 1.0)
_positive = _bounded(int, 1)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _summarise(directory: Path, index: ShardIndex) -> int:
    """Print what was written; 1 when the writer left the output unfinished (no sample, too many rejected)."""
    total = index.info["inputs"]  # write_shards records it; with long texts in pieces it differs from the samples
    fraction = index.rejected / total if total else 0.0
    where = f", reasons in {directory / REJECTED_FILE}" if index.rejected else ""
    written = total - index.rejected
    pieces = f" from {written} inputs (long texts in pieces)" if index.samples != written else ""
    print(f"{directory}: wrote {index.samples} samples{pieces} in {_plural(len(index.shards), 'shard')} "
          f"({human_bytes(index.bytes)}); rejected {index.rejected} of {total} ({fraction:.1%}){where}")
    for seen in index.info.get("rejections", [])[:MAX_REASONS_SHOWN]:
        print(f"  {seen['count']} for {seen['field']}, e.g. {seen['example']}")
    if index.stopped:
        print(f"error: {directory}: {index.stopped}; the output was left unfinished (no {INDEX_FILE}: nothing takes "
              f"it for finished data), the same command with --overwrite replaces it", file=sys.stderr)
        return 1
    return 0


def _split_summary(indexes: list[ShardIndex], fraction: float) -> str:
    """The share of the samples ``--val-fraction`` put in val, over every output (each index records its split)."""
    val = sum(index.samples for index in indexes if index.info.get("split") == "val")
    total = sum(index.samples for index in indexes)
    share = val / total if total else 0.0
    return (f"val: {val} of {_plural(total, 'sample')} ({share:.1%}; --val-fraction {fraction}, by a hash of each key "
            f"and --seed: the same samples every run)")


def _shard_source_error(args: argparse.Namespace) -> str | None:
    if args.resume and args.overwrite:
        return "--resume keeps the outputs an earlier run completed, --overwrite rewrites them: pick one"
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        return (f"--val-fraction {args.val_fraction}: give the share of the samples for the val split, between 0 "
                f"and 1 (0.1 for a tenth), or leave it out for no split")
    if (args.val_fraction or len(args.manifest or ()) > 1) and args.out.exists() and not args.out.is_dir():
        return f"--out {args.out} is not a directory (it would hold one output directory per split or manifest)"
    if args.input_dir is not None:
        return _folder_error(args)
    if args.label_from_folder:
        return "--label-from-folder needs --input-dir (a manifest's rows give their labels)"
    missing = [str(m) for m in args.manifest if not m.is_file()]
    if missing:
        return f"--manifest {', '.join(missing)}: no such file"
    outputs = [out for _, out, _ in _manifest_outputs(args)]
    shared = sorted({out for out in outputs if outputs.count(out) > 1})
    return f"--manifest: two files would both write {shared[0]}" if shared else None


def _folder_error(args: argparse.Namespace) -> str | None:
    if not args.input_dir.is_dir():
        return f"--input-dir {args.input_dir}: no such directory"
    shards = sorted(p.name for p in args.input_dir.glob("*") if is_shard_name(p.name))
    if shards:
        return (f"--input-dir {args.input_dir} holds WebDataset shards ({shards[0]}, ...): they need no "
                f"re-sharding; `python -m data_prep index {args.input_dir}` writes their index.json, and "
                f"training reads them as they are")
    if args.rename or args.other_fields != "reject":
        return "--rename and --other-fields apply to --manifest lines, not to --input-dir files"
    if args.resume:
        return "--resume applies to --manifest (a folder is one output: rewrite it with --overwrite)"
    if args.out.resolve().is_relative_to(args.input_dir.resolve()):
        return (f"--out {args.out} lies inside --input-dir {args.input_dir}, whose files would become samples; "
                "pick an --out outside it")
    return None


def _split_outputs(args: argparse.Namespace) -> list[tuple[Path, ValSplit | None]]:
    """``--out`` itself, or with ``--val-fraction`` a directory per split in it."""
    if not args.val_fraction:
        return [(args.out, None)]
    return [(args.out / name, ValSplit(name, args.val_fraction)) for name in SPLITS]


def _manifest_outputs(args: argparse.Namespace) -> list[tuple[Path, Path, ValSplit | None]]:
    """(manifest, output directory, split): a split's directory itself for one manifest, ``<it>/<name>`` for each of
    several (so that a split's directory is one training spec)."""
    return [(m, base if len(args.manifest) == 1 else base / manifest_stem(m), split)
            for base, split in _split_outputs(args) for m in args.manifest]


def _shard(args: argparse.Namespace) -> int:
    error = _shard_source_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    limits = ShardLimits(max_samples=args.max_samples_per_shard, max_bytes=int(args.max_shard_mb * 1_000_000),
                         min_shards=args.min_shards)
    # --resume rewrites an output that an earlier run cut off, as --overwrite would
    options = ShardOptions(seed=args.seed, limits=limits, audio_rate=args.audio_rate,
                           overwrite=args.overwrite or args.resume, text_chunk_bytes=args.text_chunk_bytes,
                           shuffle_buffer_bytes=int(args.shuffle_buffer_mb * 1_000_000),
                           max_reject_fraction=args.max_reject_fraction, unit_options=_given_unit_options(args))
    written = _shard_folder(args, options) if args.input_dir is not None else _shard_manifests(args, options)
    indexes = [index for _, index in written if index is not None]
    if args.input_dir is not None and indexes and "passed_over" in indexes[0].info:
        print(f"{args.input_dir}/: {describe_passed_over(indexes[0].info['passed_over'])}")
    if args.val_fraction and indexes:
        print(_split_summary(indexes, args.val_fraction))
    return max(code for code, _ in written)


def _shard_folder(args: argparse.Namespace, options: ShardOptions) -> list[tuple[int, ShardIndex]]:
    """(exit code, index) of each output; every output is checked before any is written."""
    outputs = _split_outputs(args)
    for out, _ in outputs:
        prepare_output(out, options.overwrite)
    with worker_pool(args.workers) as pool:
        indexes = shard_folder(args.input_dir, [(out, replace(options, split=split)) for out, split in outputs],
                               args.label_from_folder, pool)
    return [(_summarise(out, index), index) for (out, _), index in zip(outputs, indexes)]


def _shard_manifests(args: argparse.Namespace, options: ShardOptions) -> list[tuple[int, ShardIndex | None]]:
    """(exit code, index) of each output (no index for a manifest cut off); every output is checked before any is
    written."""
    fmt = ManifestFormat(rename=tuple(args.rename), other_fields=args.other_fields)
    written, todo = [], []
    for manifest, out, split in _manifest_outputs(args):
        each = replace(options, split=split)
        done = _completed(out, {**manifest_info(manifest, fmt), **each.recorded()}) if args.resume else None
        if done is None:
            prepare_output(out, options.overwrite)
            todo.append((manifest, out, each))
        else:
            print(f"{out}: kept, completed earlier from {manifest.name} with these options")
            written.append((_summarise(out, done), done))
    for out, result in shard_manifests(todo, fmt, args.workers):
        if isinstance(result, ManifestError):  # the others still get written
            print(f"error: {result}", file=sys.stderr)
            written.append((1, None))
        else:
            written.append((_summarise(out, result), result))
    return written


def _completed(out: Path, recorded: dict[str, Any]) -> ShardIndex | None:
    """For ``--resume``: the index of an output an earlier run completed (its index is written last) with the same
    manifest and options, or ``None`` where there is none (absent, cut off by a kill, or left unfinished with too
    many rejections: written anew). An output written otherwise raises :class:`OutputError`."""
    try:
        index = read_index(out)
    except IndexFileError:
        return None
    for name, value in recorded.items():
        if index.info.get(name) != value:
            raise OutputError(f"{out} was written with {name} {index.info.get(name)!r}, not {value!r}; pass "
                              "--overwrite to rewrite it, or pick another --out")
    return index


def _build_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    sources = DemoSources(fashion_dir=args.fashion_dir, npm_cache=args.npm_cache, espeak=args.espeak)
    result = build_demo(args.out, size=args.size, sources=sources, seed=args.seed, workers=args.workers,
                        audio_rate=args.audio_rate, overwrite=args.overwrite,
                        max_reject_fraction=args.max_reject_fraction)
    for missing in result.missing:
        print(f"missing source {missing}", file=sys.stderr)
    if result.missing:
        print(f"(every source at once: {INSTALL_SCRIPT})", file=sys.stderr)
    if not result.indexes:
        print("error: no demo source is installed, nothing was built", file=sys.stderr)
        return 1
    codes = [_summarise(args.out / split, index) for split, index in result.indexes.items()]
    print(f"built the {args.size} demo corpus in {time.perf_counter() - start:.1f} s")
    return max(codes)


def _print_problems(problems: list) -> None:
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        print(problem)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more problems")


def _joined(specs: list[str]) -> str:
    """Several SPEC arguments (a shell's glob of shards) as one list."""
    return "::".join(specs)


def _validate(args: argparse.Namespace) -> int:
    spec = _joined(args.spec)
    report = validate(spec, workers=args.workers)
    _print_problems(report.problems)
    for note in report.notes:
        print(f"note: {note}")
    count = len(report.problems)
    verdict = _plural(count, "problem") if count else "no problems"
    print(f"{spec}: checked {_plural(report.shards, 'shard')}, {_plural(report.samples, 'sample')}: {verdict}")
    return 1 if report.problems else 0


def _index(args: argparse.Namespace) -> int:
    code = 0
    for done in index_shards(_joined(args.spec), args.out, args.workers, args.overwrite):
        _print_problems(done.problems)
        index, where = done.index, join(done.location, INDEX_FILE)
        if not index.shards:
            print(f"error: {done.location}: no shard could be read; nothing was written", file=sys.stderr)
            code = 1
            continue
        left = f"; {_plural(done.unreadable, 'unreadable shard')} left out" if done.unreadable else ""
        damaged = f"; {_plural(len(done.problems), 'problem')} above (damaged shards are listed with the samples " \
                  f"they give)" if done.problems else ""
        fields = ", ".join(f"{name} {count}" for name, count in index.totals("modalities").items()) or "none"
        print(f"{where}: {_plural(len(index.shards), 'shard')}, {_plural(index.samples, 'sample')} "
              f"({human_bytes(index.bytes)}; samples per modality: {fields}){left}{damaged}")
    return code


def _stats(args: argparse.Namespace) -> int:
    print(stats(_joined(args.spec), workers=args.workers))
    return 0


def _writing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    parser.add_argument("--seed", type=int, default=0, help="sample order; equal seeds give byte-identical shards")
    parser.add_argument("--workers", type=_positive, default=_default_workers(),
                        help="processes (default: every core): several manifests are sharded side by side, up to "
                             "this many at once, each with its share of the workers and the shuffle buffer; within "
                             "one, they decode media")
    parser.add_argument("--audio-rate", type=_positive, default=16_000, help="sample rate of the stored FLAC audio")
    parser.add_argument("--max-reject-fraction", type=_fraction, default=0.01,
                        help="more rejected samples than this fraction of an output's (each split's, each "
                             "manifest's) fail the command (exit 1) and leave that output unfinished: no index.json, "
                             "its .writing saying why (as when no sample is written)")


def _unit_options(parser: argparse.ArgumentParser) -> None:
    """The modalities' own options (``prep_options`` of their units): ``--series-max-length`` and the like."""
    for unit in STORED.values():
        for name, (default, text) in unit.prep_options.items():
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                                type=_positive if isinstance(default, int) else type(default),
                                help=f"{text} (default {default})")


def _given_unit_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """The unit options given on the command line, for ``ShardOptions.unit_options``."""
    return tuple((name, getattr(args, name)) for unit in STORED.values() for name in unit.prep_options
                 if getattr(args, name) is not None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each sets ``run``)."""
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    shard = commands.add_parser("shard", help="a JSONL manifest or a folder of files -> checked WebDataset shards "
                                              "(with --val-fraction: train/ and val/)")
    source = shard.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, nargs="+",
                        help="one JSON object a line: {" + ", ".join(f'"{name}"?' for name in ALLOWED_FIELDS) +
                             "}; media paths relative to the manifest; several: one directory each under --out, "
                             "named after the file (a corpus of many files: a folder a training spec names)")
    source.add_argument("--input-dir", type=Path,
                        help="a folder of files, one sample per path without its suffix (a/1.png + a/1.txt); "
                             f"suffixes: {' '.join(SUFFIX_FIELD)} (.cls: an integer label, .json: metadata); "
                             "hidden files and lone README, LICENSE, .md, .pdf, ... files are passed over (counted in "
                             "the summary), any other file rejects its sample")
    shard.add_argument("--rename", type=_renaming, action="append", default=[], metavar="SOURCE=FIELD",
                       help="with --manifest: read a line's SOURCE as FIELD (content=text, id=key); repeatable")
    shard.add_argument("--other-fields", choices=OTHER_FIELDS, default="reject",
                       help="with --manifest: fields the schema lacks reject their line (default), go into meta, "
                            "or are ignored")
    shard.add_argument("--label-from-folder", action="store_true",
                       help="with --input-dir: the top folder is the class (sorted names -> 0, 1, ...; "
                            "listed in index.json)")
    shard.add_argument("--text-chunk-bytes", type=_chunk_bytes, default=0, metavar="N",
                       help="write a text-only sample longer than N UTF-8 bytes as samples of at most N, shuffled like "
                            "the others (key-0, key-1, ...; set N to the model's model.text.max_length); 0: never")
    shard.add_argument("--val-fraction", type=float, metavar="F",
                       help="also write a validation split: --out/train/ and --out/val/, each a complete output "
                            "(several manifests: --out/train/<name>/, --out/val/<name>/); a sample is in val when a "
                            "hash of --seed and its key falls below F (0 < F < 1): the same samples every run, "
                            "disjoint by key, a long text's pieces with their document")
    shard.add_argument("--resume", action="store_true",
                       help="with --manifest (not --input-dir): keep each output (a file's, a split's) that an "
                            "earlier run completed from the same manifest with the same options; write the others "
                            "anew, those cut off by a kill or left unfinished included (a killed run of many files "
                            "goes on)")
    shard.add_argument("--max-samples-per-shard", type=_positive, default=10_000)
    shard.add_argument("--min-shards", type=_positive, default=16, metavar="N",
                       help="spread an output of at least N samples over at least N shards: a training run needs a "
                            "shard for each of its processes x data.num_workers readers, which a small dataset "
                            "would not give (1: only the limits above decide)")
    shard.add_argument("--max-shard-mb", type=_bounded(float, 1e-6), default=1000.0,
                       help="sample data per shard, in 10^6 bytes")
    shard.add_argument("--shuffle-buffer-mb", type=_bounded(float, 1e-6),
                       default=ShardOptions.shuffle_buffer_bytes / 1_000_000,
                       help="inputs held in memory while shuffling, in 10^6 bytes; more go through temporary files "
                            "in --out (the order is the same)")
    _writing_options(shard)
    _unit_options(shard)
    shard.set_defaults(run=_shard)

    demo = commands.add_parser("build-demo", help="the demo corpus (train/, val/, downstream_train/, "
                                                  "downstream_eval/) from installed packages")
    demo.add_argument("--size", choices=sorted(SIZES), default="small",
                      help="small: 2,000 Fashion-MNIST images, 1,000 passages, 200 spoken sentences, 32 clips; medium: "
                           "the same but every Fashion-MNIST training image (60,000); full: every source whole, 5,000 "
                           "spoken sentences")
    demo.add_argument("--fashion-dir", type=Path, default=FASHION_DIR, help="Fashion-MNIST IDX files")
    demo.add_argument("--npm-cache", type=Path, default=default_npm_cache(), help="where the npm packs are")
    demo.add_argument("--espeak", default="espeak-ng", help="the espeak-ng program")
    _writing_options(demo)
    demo.set_defaults(run=_build_demo)

    spec_help = ("shards of any writer: a shard directory or a folder of them (build-demo's output), a remote prefix "
                 "(s3://bucket/c4/, gs://..., http(s)://.../ with index.json), paths, URLs or brace patterns of "
                 "shards (.tar, .tar.gz, .tgz); several are one list (as SPEC::SPEC)")
    index = commands.add_parser("index", help="index.json for existing shards of any writer, local or remote "
                                              "(read once, in parallel; the shards are not rewritten)")
    index.add_argument("spec", metavar="SPEC", nargs="+", help=spec_help)
    index.add_argument("--out", help="where index.json goes: a folder, or an s3:// or gs:// prefix (default: the "
                                     "shards' own folder or prefix; needed for shards from several places or a web "
                                     "server); it names shards elsewhere by URL or absolute path")
    index.add_argument("--overwrite", action="store_true", help="replace an existing index.json")
    index.add_argument("--workers", type=_positive, default=_default_workers(), help="shards read at once")
    index.set_defaults(run=_index)

    check = commands.add_parser("validate", help="decode every sample, check tars and index; exit 1 on problems")
    check.add_argument("spec", metavar="SPEC", nargs="+", help=spec_help)
    check.add_argument("--workers", type=_positive, default=_default_workers())
    check.set_defaults(run=_validate)

    summary = commands.add_parser("stats", help="samples and bytes per modality, from index.json (else by reading "
                                                "the shards)")
    summary.add_argument("spec", metavar="SPEC", nargs="+", help=spec_help)
    summary.add_argument("--workers", type=_positive, default=_default_workers(),
                         help="shards read at once where there is no index")
    summary.set_defaults(run=_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OutputError, IndexFileError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
