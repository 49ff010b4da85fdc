"""Shards -> the stream's kept samples: each shard read by ``pretrain.shards.read`` (which skips and counts what
cannot be read), samples checked against what the run reads, shards cycled so that no reader runs dry.

Besides the shard reader's reasons (``unreadable_shard``, ``corrupt_tar``, ``stalled_shard``, ``duplicate_file``),
skips counted here and by the batch builder:

* ``missing_key:<ext>``: a sample without a key listed in ``data.require``.
* ``no_usable_modality``: a sample with none of the keys the model reads, nor any other medium or label.
* ``unused`` (counted, never logged: not a fault of the data): a sample whose media or label are all of modalities
  the run does not read (video-only samples for a model without ``model.video``), passed over by design.
* ``undecodable:<ext>`` (counted by the batch builder): media that failed to decode.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator, List, Optional, Sequence

from ..shard_format import FIELD_MODALITY, META_FIELD
from ..shards import DataError, Shard, SkipCounter
from ..shards.read import UNUSED, Sample, read_shards

MEDIA_KEYS = frozenset(FIELD_MODALITY) - {META_FIELD}


def sample_selector(
    required: Sequence[str], usable: Sequence[str], extra: Sequence[str] = ()
) -> Callable[[Sample, SkipCounter], Optional[Sample]]:
    """A check that keeps samples holding every ``required`` key and at least one ``usable`` one, slimmed to those
    and the ``extra`` keys (a shuffle buffer of raw samples should not hold metadata nobody decodes)."""
    wanted = set(required) | set(usable) | set(extra) | {"__key__", "__url__"}

    def select(sample: Sample, counter: SkipCounter) -> Optional[Sample]:
        for key in required:
            if key not in sample:
                counter.skip(f"missing_key:{key}", sample["__url__"], key=sample["__key__"])
                return None
        if not any(key in sample for key in usable):
            reason = UNUSED if MEDIA_KEYS & set(sample) else "no_usable_modality"
            counter.skip(reason, sample["__url__"], f"keys {sorted(sample)}", sample["__key__"])
            return None
        return {key: value for key, value in sample.items() if key in wanted}

    return select


def shard_samples(
    shards: List[Shard],
    rng: random.Random,
    resample: bool,
    select: Callable[[Sample, SkipCounter], Optional[Sample]],
    counter: SkipCounter,
    where: str,
    stall_timeout_s: float,
    retries: int,
    endless: bool = True,
) -> Iterator[Sample]:
    """An endless stream of kept samples from ``shards``: in order, then reshuffled passes (or shards drawn with
    replacement, weighted by sample count, when ``resample``). Endless, so no reader ever runs dry before its
    rank's batch quota; raises once every shard has been read without yielding a sample, instead of spinning.
    Not ``endless``: one pass in order, every sample once (validation)."""
    urls = [shard.url for shard in shards]
    weights = [shard.samples for shard in shards] if all(s.samples for s in shards) else None

    def passes() -> Iterator[str]:
        order = list(urls)
        if not endless:
            yield from order
            return
        while True:
            yield from rng.choices(urls, weights) if resample else order
            rng.shuffle(order)

    empty: set = set()
    productive = False
    with contextlib.closing(read_shards(passes(), counter, stall_timeout_s, retries)) as shards_read:
        for url, samples in shards_read:
            kept = 0
            for sample in samples:
                selected = select(sample, counter)
                if selected is not None:
                    kept += 1
                    yield selected
            if kept:
                productive = True
            elif endless and not productive:
                empty.add(url)
                if len(empty) == len(set(urls)):
                    raise DataError(
                        f"{where}: no usable sample in any of its {len(empty)} shards (e.g. {urls[0]}); skipped so "
                        f"far: {dict(counter.total)}. Check them with `python -m data_prep validate DIR` and "
                        f"data.require against the keys the shards hold"
                    )
