"""The HDF5 feature cache: its layout (:mod:`~featx.cache.layout`), the reader that validates
and serves it (:mod:`~featx.cache.reader`) and the writer that fills, resumes and locks it
(:mod:`~featx.cache.writer`); split views (:mod:`~featx.cache.views`) serve another split of
a cache's rows without copying them. Plain h5py reads every file; nothing here imports torch."""
from featx.cache.layout import (
                                PROVENANCE_KEYS,
                                READABLE_SCHEMAS,
                                SCHEMA_VERSION,
                                CacheError,
                                StaleCacheError,
                                cache_filename,
                                decode_attr,
                                diff_provenance,
                                encode_attr,
                                partial_path,
                                provenance_covers,
                                read_attrs,
)
from featx.cache.reader import Cache
from featx.cache.views import ResplitResult, resplit, resplit_items, view_path
from featx.cache.writer import CacheLockedError, CacheWriter, free_bytes, lock_cache, lock_path

__all__ = ["PROVENANCE_KEYS", "READABLE_SCHEMAS", "SCHEMA_VERSION", "Cache", "CacheError", "CacheLockedError",
           "CacheWriter", "StaleCacheError", "cache_filename", "decode_attr", "diff_provenance",
           "encode_attr", "free_bytes", "lock_cache", "lock_path", "partial_path",
           "provenance_covers", "read_attrs", "ResplitResult", "resplit", "resplit_items",
           "view_path"]
