"""Convert a MoCo (v1/v2) ResNet-50 checkpoint into a torchvision ``resnet50`` teacher checkpoint.

    python tools/convert_moco.py moco_v2_800ep_pretrain.pth.tar \
        data/teachers/imagenet/moco_v2_800ep_r50.pth

MoCo's ``main_moco.py`` saves ``{"state_dict": {"module.encoder_q.<resnet50 key>": ...}}`` with
the query encoder's projection MLP under ``encoder_q.fc.*`` (and the key encoder and queue beside
it). The output holds ``{"model": state}`` with the query encoder's backbone and a zero ``fc`` of
``--num-classes`` outputs, so that ``teacher.arch: resnet50`` loads it strictly. Only the backbone
is meaningful: CoSS reads the pooled embedding, never the logits (spec §4.2, "fc replaced by
Identity").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

PREFIX = "module.encoder_q."


def convert(state: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """The query encoder's backbone keys without their prefix, plus a zero fc (2048 → C)."""
    out = {k[len(PREFIX):]: v for k, v in state.items()
           if k.startswith(PREFIX) and not k.startswith(PREFIX + "fc.")}
    if not out:
        raise ValueError(f"expected keys starting with {PREFIX!r}, found e.g. {list(state)[:3]}")
    out["fc.weight"] = torch.zeros(num_classes, 2048)
    out["fc.bias"] = torch.zeros(num_classes)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", help="MoCo checkpoint (main_moco.py format)")
    p.add_argument("dst", help="output checkpoint for teacher.weights")
    p.add_argument("--num-classes", type=int, default=1000)
    args = p.parse_args(argv)
    ckpt = torch.load(args.src, map_location="cpu", weights_only=False)  # MoCo pickles its args
    state = convert(ckpt.get("state_dict", ckpt), args.num_classes)
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, args.dst)
    print(f"wrote {args.dst}: {len(state)} tensors (resnet50 backbone of {args.src}, zero fc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
