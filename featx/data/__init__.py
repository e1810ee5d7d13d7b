"""Finding images and labels: the three layouts, manifests, the split, fingerprints.

Decoding and transforms (:mod:`featx.data.images`: ``ImageFiles``, ``TransformSpec``,
``load_rgb``) need torch, which the rest of this package does not: they are imported from
that module, so ``featx info`` and ``featx report`` start without torch.
"""
from featx.data.dataset import (
                                IMAGE_EXTENSIONS,
                                MAX_SEED,
                                SPLITS,
                                DataError,
                                DataParameterError,
                                DatasetSpec,
                                check_seed,
                                dataset_fingerprints,
                                file_list_fingerprint,
                                load_dataset,
                                parse_split_fractions,
)
from featx.data.digits import write_digits_dataset

__all__ = ["IMAGE_EXTENSIONS", "MAX_SEED", "SPLITS", "DataError", "DataParameterError",
           "DatasetSpec", "check_seed", "dataset_fingerprints", "file_list_fingerprint",
           "load_dataset", "parse_split_fractions", "write_digits_dataset"]
