"""Config rules of the training-set selection keys (``data.train_fraction``, ``drop_classes``,
``drop_classes_keep``, ``subset_seed``; applied by ``pipeline/data/subset.py``).

Class ids are checked against the dataset's class count when the index is built (the config
does not know it unless ``data.num_classes`` says so).
"""

from __future__ import annotations

from pipeline.config.coerce import fail
from pipeline.config.schema import DataSpec


def check_train_selection(data: DataSpec, root: str) -> None:
    """Value rules; ``root`` is the config file errors name."""
    if not 0.0 < data.train_fraction <= 1.0:
        fail("data.train_fraction", f"expected a fraction in (0, 1], found {data.train_fraction}",
             root)
    drop = data.drop_classes
    if any(c < 0 for c in drop):
        fail("data.drop_classes", f"expected class ids >= 0, found {drop}", root)
    if len(set(drop)) != len(drop):
        fail("data.drop_classes", f"expected distinct class ids, found {drop}", root)
    if data.num_classes and any(c >= data.num_classes for c in drop):
        fail("data.drop_classes", f"expected class ids < data.num_classes = {data.num_classes}, "
             f"found {drop}", root)
    if data.drop_classes_keep < 0:
        fail("data.drop_classes_keep", f"expected a count >= 0, found {data.drop_classes_keep}",
             root)
    if data.drop_classes_keep > 0 and not drop:
        fail("data.drop_classes_keep", f"expected data.drop_classes to name the classes to keep "
             f"{data.drop_classes_keep} samples of, found drop_classes []", root)
