"""Finding images and labels: the three layouts, manifests, the split, fingerprints.

:func:`load_dataset` (:mod:`~featx.data.dataset`) reads a folder layout
(:mod:`~featx.data.folders`) or a CSV manifest (:mod:`~featx.data.manifest`) into a
:class:`DatasetSpec` (:mod:`~featx.data.spec`) whose split (:mod:`~featx.data.split`) is fixed;
:mod:`~featx.data.fingerprints` says when two file lists are the same;
:mod:`~featx.data.subsets` draws labelled subsets of train for label-efficiency curves.

Decoding and transforms (:mod:`featx.data.images`: ``ImageFiles``, ``TransformSpec``,
``load_rgb``) need torch, which the rest of this package does not: they are imported from
that module, so ``featx info`` and ``featx report`` start without torch.
"""
from featx.data.dataset import load_dataset
from featx.data.digits import write_digits_dataset
from featx.data.fingerprints import dataset_fingerprints, file_list_fingerprint
from featx.data.spec import (IMAGE_EXTENSIONS, MAX_SEED, SPLITS, DataError, DataParameterError,
                             DatasetSpec)
from featx.data.split import check_seed, parse_split_fractions, split_per_class
from featx.data.subsets import TrainSubset, draw_train_subset, train_subsets

__all__ = ["IMAGE_EXTENSIONS", "MAX_SEED", "SPLITS", "DataError", "DataParameterError",
           "DatasetSpec", "TrainSubset", "check_seed", "draw_train_subset", "dataset_fingerprints", "file_list_fingerprint",
           "load_dataset", "parse_split_fractions", "split_per_class", "train_subsets",
           "write_digits_dataset"]
