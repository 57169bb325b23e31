"""The data stage: dataset index → augmentation plan → loader backend → Batch.

``build_train_loader`` / ``build_eval_loader`` dispatch on ``data.backend`` (backends.py).

Importing this package registers every dataset reader in ``DATASETS``.
"""

from pipeline.data import arrays as _arrays  # noqa: F401  (registers cifar10/100, stl10, synthetic)
from pipeline.data import formats as _formats  # noqa: F401  (registers imagefolder, demo, tiny)
from pipeline.data.backends import BackendUnavailable, build_eval_loader, build_train_loader
from pipeline.data.device import to_device
from pipeline.data.index import (
    DATASETS,
    BadSample,
    DatasetIndex,
    UnreadableSample,
    build_index,
)
from pipeline.data.loader import EvalLoader, TrainLoader
from pipeline.data.plan import AugPlan, Crop, view_for_epoch
from pipeline.data.subset import build_train_index
from pipeline.data.transforms import EvalTransform

__all__ = [
    "DATASETS",
    "AugPlan",
    "BackendUnavailable",
    "BadSample",
    "Crop",
    "DatasetIndex",
    "EvalLoader",
    "EvalTransform",
    "TrainLoader",
    "UnreadableSample",
    "build_eval_loader",
    "build_index",
    "build_train_index",
    "build_train_loader",
    "to_device",
    "view_for_epoch",
]
