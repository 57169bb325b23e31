"""The online teacher source: the frozen network, run in eval mode under no_grad (optionally
with its BatchNorm layers on batch statistics, ``batch_stats``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.config.schema import TeacherSpec
from pipeline.models.base import Net, build_model
from pipeline.types import Batch, StageInfo, TeacherOutput


class OnlineTeacher:
    """Runs the teacher on each batch and returns what the method asked for: the outputs in
    ``fields`` (``logits``, ``embedding``) and the stage maps ``stages`` (stage indices).

    ``batch_stats``: BatchNorm layers normalise with the statistics of each batch, as a teacher
    left in train mode does (``Requirements.teacher_batch_stats``), without updating their
    running estimates (``track_running_stats`` off), so the checkpoint's buffers never change.
    """

    def __init__(self, model: Net, fields: tuple[str, ...], stages: tuple[int, ...] = (),
                 preact: bool = False, batch_stats: bool = False) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fields = fields
        self.stages = tuple(stages)
        self.preact = preact
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.batch_norms = norms if batch_stats else []
        self.stage_info: tuple[StageInfo, ...] = ()
        self.parts = None  # pipeline.teacher.parts.TeacherParts, set by the run's build step

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    def to(
        self,
        device: torch.device,
        channels_last: bool = False,
        dtype: torch.dtype | None = None,
    ) -> OnlineTeacher:
        """Move the network to ``device``; ``channels_last``: the student's memory format (else
        cuDNN converts every input); ``dtype``: cast the frozen conv/linear weights once to the
        autocast dtype (autocast does not cache casts of weights without gradients and would
        re-cast them at every call). See ``cast_frozen_weights``."""
        self.model.to(device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if dtype is not None:
            cast_frozen_weights(self.model, dtype)
        return self

    @torch.no_grad()
    def __call__(self, batch: Batch, images: Tensor) -> TeacherOutput:
        for bn in self.batch_norms:  # set on every call: a probe's eval()/train() resets modes
            bn.train()
            bn.track_running_stats = False
        out = self.model(images, feats=self.stages or False, preact=self.preact)
        return TeacherOutput(
            logits=out.logits if "logits" in self.fields else None,
            embedding=out.embedding if "embedding" in self.fields else None,
            feats=out.feats if self.stages else None,
        )


_AUTOCAST_WEIGHTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def cast_frozen_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters of convolutions and linear layers to ``dtype`` (in place).

    These are the weights autocast would cast at every call; normalisation layers keep float32,
    as under autocast, so outputs under autocast are the same as without the cast.
    """
    for module in model.modules():
        if isinstance(module, _AUTOCAST_WEIGHTS):
            module.to(dtype)
    return model


def build_teacher_model(
    spec: TeacherSpec, num_classes: int, load: bool = True
) -> tuple[nn.Module, dict]:
    """The teacher network with its weights (``load=False`` leaves it random, for dry runs)."""
    from pipeline.models.weights import load_weights_for

    model = build_model(spec.arch, num_classes)
    info: dict = {}
    if load and spec.weights:  # a file that does not fit teacher.arch: a ConfigError
        info = load_weights_for(model, spec.weights, spec.arch, "teacher")
    return model, info


def teacher_run_id(weights: str | None) -> str | None:
    """The MLflow run that produced a teacher checkpoint, when it came from one of our runs."""
    if not weights or weights.startswith("torchvision:"):
        return None
    info = Path(weights).resolve().parent / "run_info.json"
    if not info.exists():
        return None
    import json

    return json.loads(info.read_text()).get("mlflow_run_id")
