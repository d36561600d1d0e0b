"""The data pipeline: sources -> normalized documents -> train/val/test splits -> token shards.

* :mod:`~scratchlm.data.sources` finds raw text (named corpora fetched by :mod:`scratchlm.downloads`,
  the local Python standard library, your own files);
* :mod:`~scratchlm.data.normalize` makes it clean, predictable Unicode and says what it changed;
* :mod:`~scratchlm.data.prepare` splits it by document, checks for leakage, writes a manifest;
* :mod:`~scratchlm.data.shards` turns a split into a binary file of token ids with a header;
* :mod:`~scratchlm.data.loader` reads shards through memmap as random ``(x, y)`` windows.
"""

from scratchlm.data.loader import BatchLoader
from scratchlm.data.normalize import read_text_file
from scratchlm.data.prepare import Dataset, LeakageError, check_leakage, prepare_dataset
from scratchlm.data.shards import (
    ShardError,
    open_shard,
    read_shard_header,
    tokenize_dataset,
    verify_shards,
    write_shard,
)
from scratchlm.data.sources import read_source

__all__ = [
    "BatchLoader",
    "Dataset",
    "LeakageError",
    "ShardError",
    "check_leakage",
    "open_shard",
    "prepare_dataset",
    "read_shard_header",
    "read_source",
    "read_text_file",
    "tokenize_dataset",
    "verify_shards",
    "write_shard",
]
