"""Shards of any writer, from anywhere: specs -> shard lists with counts (``specs``), a URL -> its tar bytes
(``opener``, ``remote``), tar -> samples (``tar``, ``read``).

Both sides of the shard contract use it, ``data_prep`` (index, validate, stats) and ``pretrain.data`` (the training
stream), so a shard reads the same everywhere. It imports nothing of the project but ``pretrain.shard_format``, and no
torch.
"""

from .opener import PIPE_PREFIX, open_shard
from .read import SkipCounter, ShardReader, read_shard
from .remote import is_remote
from .specs import DataError, Shard, expand_spec, listed_classes, total_samples

__all__ = ["PIPE_PREFIX", "DataError", "Shard", "ShardReader", "SkipCounter", "expand_spec", "is_remote",
           "listed_classes", "open_shard", "read_shard", "total_samples"]
