"""The single frozen pass: images -> backbone -> every feature -> one HDF5 cache.

:func:`extract` runs it in one process (:mod:`~featx.extract.single`) or, under torchrun, as
one of several processes writing shards that rank 0 joins (:mod:`~featx.extract.sharded`);
both fill their files through the one loop of :mod:`~featx.extract.fill`.
"""
from featx.extract.fill import ExtractResult, fill_cache
from featx.extract.repool import repool
from featx.extract.sharded import extract_sharded, shard_bounds, shard_dir, shard_path
from featx.extract.single import extract, parse_pools

__all__ = ["ExtractResult", "extract", "extract_sharded", "fill_cache", "parse_pools", "repool",
           "shard_bounds", "shard_dir", "shard_path"]
