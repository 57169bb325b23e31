"""What ``data.root`` must hold for each ``data.dataset``: the text of a missing-data error.

The readers themselves live in ``pipeline/data/formats.py`` and ``arrays.py``; this table only
says, in one line per dataset kind, what they look for, so a run on a machine without the data
says which layout to put where and which key to set, instead of just "not found".
"""

from __future__ import annotations

LAYOUTS = {
    "imagefolder": "an ImageFolder: <root>/<split>/<class>/<image> for every split, e.g. "
    "ImageNet's train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the val images sorted into their "
    "1000 wnid folders)",
    "demo": "the bundled demo data <root>/<split>/<class>/*.jpg; make it with: "
    "python tools/make_demo_data.py",
    "tiny_imagenet": "Tiny-ImageNet-200 as distributed: wnids.txt, train/<wnid>/images/*.JPEG, "
    "val/images/*.JPEG and val/val_annotations.txt",
    "cifar10": "the CIFAR-10 python pickles: cifar-10-batches-py/ (data_batch_1..5, test_batch, "
    "batches.meta), or that folder itself",
    "cifar100": "the CIFAR-100 python pickles: cifar-100-python/ (train, test, meta), or that "
    "folder itself",
    "stl10": "the STL-10 binaries: stl10_binary/ ({train,test}_X.bin, {train,test}_y.bin, "
    "class_names.txt), or that folder itself",
}


def layout_hint(dataset: str) -> str:
    """``expected <layout>; set it with --set data.root=...`` for ``data.dataset: dataset``."""
    layout = LAYOUTS.get(dataset)
    where = f"data.root must hold {layout}; " if layout else ""
    return f"{where}set it with --set data.root=/path/to/{dataset} (README: Your data)"
