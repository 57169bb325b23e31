"""A trained network as an MLflow model (PyTorch flavour) of its run.

``mlflow.pytorch.load_model(f"runs:/{run_id}/model")`` returns a module that maps float32
images (N, 3, H, W), normalised as in training, to the network's logits: exactly the logits of
``student.pt`` loaded into ``model.arch`` (``net(x).logits``). It is saved in MLflow 3's default
``pt2`` format (``torch.export``: no pickled code, loads without this repository), traced on two
sample images with a dynamic batch dimension, with a tensor signature. For a method that predicts
with a head of its own (CID's interventional classifier) this is the network's own classifier, as
in ``student.pt``; ``launch/evaluate.py --head method`` scores the method's head.

The steps are those of ``mlflow.pytorch.log_model``, done through one ``MlflowClient`` with an
explicit experiment: ``log_model(run_id=...)`` without an active fluent run files the model under
the default experiment "0" (MLflow 3.17's ``_create_logged_model``), not the run's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class Logits(nn.Module):
    """``net(x).logits``: the network's ``ModelOutput`` reduced to the tensor MLflow serves."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:  # type: ignore[override]
        return self.net(images).logits


def network_from_state(arch: str, num_classes: int, state_path: str) -> nn.Module:
    """``arch`` with the state dict at ``state_path`` loaded strictly, in eval mode."""
    from pipeline.models.base import build_model

    net = build_model(arch, num_classes)
    net.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return net.eval()


def _signature(image_size: int, num_classes: int) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size),
                                  "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]))


def log_network(client: Any, record: dict[str, Any], run_id: str) -> str:
    """Log the network of ``record`` (``state``: a state-dict file, ``arch``, ``num_classes``,
    ``image_size``, ``name``) as a logged model of ``run_id``; returns the model id."""
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    size, classes = int(record["image_size"]), int(record["num_classes"])
    module = Logits(network_from_state(record["arch"], classes, record["state"])).eval()
    example = torch.zeros(2, 3, size, size)  # batch 2: torch.export keeps a batch of 1 static
    run = client.get_run(run_id)
    name = record.get("name", "model")
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id,
        tags={"arch": record["arch"], "num_classes": str(classes), "source_state": record["state"]})
    try:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id,
                     run_id=run_id, model_id=model.model_id)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            mlflow.pytorch.save_model(
                module, str(local), mlflow_model=meta, signature=_signature(size, classes),
                input_example=example, serialization_format="pt2",
                pip_requirements=mlflow.pytorch.get_default_pip_requirements())
            client.log_model_artifacts(model.model_id, str(local))
    except Exception:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


__all__ = ["Logits", "log_network", "network_from_state"]
