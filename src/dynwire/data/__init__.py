"""Data layer: Fashion-MNIST / CIFAR / ImageNet / own class folders read from local files, and the loader.

Nothing is ever downloaded. Roots default to ``$DYNWIRE_DATA_DIR`` and ``./data`` (and, for
Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` from the Debian package
``dataset-fashion-mnist``).
"""

from ._paths import ENV_VAR
from ._safe_pickle import RestrictedUnpickler, UnsafePickleError, safe_load_pickle
from .build import (
    DATASET_NAMES,
    DatasetInfo,
    LabeledSubset,
    build_dataset,
    canonical_dataset_name,
    get_dataset_info,
)
from .cifar import CIFAR10, CIFAR100
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, find_fashion_mnist_root, read_idx
from .imagefolder import (
    BAD_IMAGE_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetFolder,
    SafeImageFolder,
    find_imagenet_split_dir,
    imagenet_transforms,
)
from .loader import EpochBatchSampler, SeededDataset, ShardSampler, build_loader, sample_seed, seed_worker

__all__ = [
    "BAD_IMAGE_MODES",
    "CIFAR10",
    "CIFAR100",
    "DATASET_NAMES",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "EpochBatchSampler",
    "FashionMNIST",
    "ImageNetFolder",
    "LabeledSubset",
    "RestrictedUnpickler",
    "SafeImageFolder",
    "SeededDataset",
    "ShardSampler",
    "UnsafePickleError",
    "build_dataset",
    "build_loader",
    "canonical_dataset_name",
    "find_fashion_mnist_root",
    "find_imagenet_split_dir",
    "get_dataset_info",
    "imagenet_transforms",
    "read_idx",
    "safe_load_pickle",
    "sample_seed",
    "seed_worker",
]
