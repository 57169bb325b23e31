"""MLflow's conventions on a real ``mlflow server`` (tests/test_mlflow_server.py's Server): source
and git tags, the run note, dataset inputs, the experiment kind, plot artifacts and a logged model
that ``mlflow.pytorch.load_model`` loads with the logits of ``student.pt``; the same calls kept in
the outage buffer and sent later; and (slow) the run's page in the MLflow UI, in headless
Chromium."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config.schema import TrackingSpec
from pipeline.track.buffer import BUFFER_NAME, read_records
from pipeline.track.conventions import (
    DIGEST_CHARS,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    UI_QUERY,
)
from pipeline.track.mlflow_tracker import Tracker
from tests.conftest import PY, ROOT, run_env, train_cmd
from tests.test_mlflow_server import Server, _free_port, _resend

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("mlflow-conventions"))
    try:
        srv.start()
        yield srv
    finally:
        srv.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def finished(server: Server, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A demo teacher run (resnet8, 2 epochs of 3 steps) logged to the server."""
    run_dir = tmp_path_factory.mktemp("conventions") / "run"
    sets = (f"data.root={demo_root}", f"tracking.uri={server.uri}",
            "tracking.experiment=conventions", "model.arch=resnet8", "optim.epochs=2",
            "optim.milestones=[]", "train.max_steps_per_epoch=3", "train.progress=false")
    out = subprocess.run(train_cmd("configs/demo/teacher.yaml", *sets, run_dir=run_dir),
                         cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (run_dir / BUFFER_NAME).exists(), out.stderr[-3000:]
    run_id = json.loads((run_dir / "run_info.json").read_text())["mlflow_run_id"]
    return {"run_dir": run_dir, "run_id": run_id, "demo_root": demo_root, "stdout": out.stdout}


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _head() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                         text=True)
    return out.stdout.strip()


def _load_logged_model(uri: str, run_id: str) -> Any:
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        return mlflow.pytorch.load_model(f"runs:/{run_id}/model")


def _demo_images(demo_root: Path, n: int = 8) -> torch.Tensor:
    from pipeline.catalog import load_run_config
    from pipeline.data import build_eval_loader, build_index, to_device

    spec = load_run_config(ROOT / "configs/demo/teacher.yaml", [f"data.root={demo_root}"])
    d = spec.data
    raw = next(iter(build_eval_loader(build_index(d, "test_unbiased"), d, 0, 1)))
    return to_device(raw, torch.device("cpu"), d.mean, d.std).images[:n].contiguous()


def _student_logits(state: Path, x: torch.Tensor) -> torch.Tensor:
    from pipeline.models import build_model

    net = build_model("resnet8", 10)
    net.load_state_dict(torch.load(state, weights_only=True))
    with torch.no_grad():
        return net.eval()(x).logits


def test_run_tags_inputs_plots_and_model(server: Server, finished: dict) -> None:
    client = _client(server.uri)
    run_dir, run_id = finished["run_dir"], finished["run_id"]
    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "launch/train.py"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.runName"] == run.info.run_name == "demo-teacher"
    assert tags["mlflow.note.content"] == "vanilla: resnet8 trained on demo (train, 4000 samples)"
    if _head():
        assert tags["mlflow.source.git.commit"] == tags["git_commit"] == _head()
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    url = f"{server.uri}/#/experiments/{exp.experiment_id}/runs/{run_id}?{UI_QUERY}"
    assert f"MLflow run: {url}" in finished["stdout"]

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"demo/train", "demo/test_unbiased", "demo/test_biased"}
    contexts = {n: [t.value for t in d.tags if t.key == "mlflow.data.context"]
                for n, d in inputs.items()}
    assert contexts == {"demo/train": ["training"], "demo/test_unbiased": ["evaluation"],
                        "demo/test_biased": ["evaluation"]}
    train = inputs["demo/train"].dataset
    assert train.digest == tags["dataset_fingerprint"][:DIGEST_CHARS]
    profile = json.loads(train.profile)
    assert profile["fingerprint"] == tags["dataset_fingerprint"]
    assert profile["num_samples"] == 4000 and profile["num_classes"] == 10

    logged = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert logged == {f"plots/{p.name}" for p in (run_dir / "plots").iterdir()}
    assert {"plots/training_curves.png", "plots/reliability_test_unbiased.png",
            "plots/confusion_test_biased.png", "plots/per_class_accuracy.png",
            "plots/feature_norms_test_unbiased.png"} <= logged
    assert "epochs.json" in {a.path for a in client.list_artifacts(run_id)}

    model = _load_logged_model(server.uri, run_id)
    x = _demo_images(finished["demo_root"])
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, _student_logits(run_dir / "student.pt", x))
    with torch.no_grad():  # the batch dimension is dynamic
        assert model(x[:3]).shape == (3, 10)


def test_evaluation_run_has_its_inputs_and_plots(server: Server, finished: dict) -> None:
    run_dir = finished["run_dir"]
    out = subprocess.run(
        [PY, str(ROOT / "launch/evaluate.py"), "--run-dir", str(run_dir),
         "--set", f"data.root={finished['demo_root']}", "--set", f"tracking.uri={server.uri}",
         "--split", "test_unbiased"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run_dir / "evaluations/resnet8-student.json").read_text())
    client = _client(server.uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["mlflow.source.name"] == "launch/evaluate.py"
    assert run.data.tags["run_kind"] == "evaluation"
    assert run.data.tags["evaluated_run_id"] == finished["run_id"]
    assert run.data.tags["mlflow.note.content"].startswith("evaluation: student resnet8")
    [ds] = run.inputs.dataset_inputs
    assert ds.dataset.name == "demo/test_unbiased"
    trained = client.get_run(finished["run_id"]).outputs.model_outputs
    assert [m.model_id for m in run.inputs.model_inputs] == [m.model_id for m in trained]
    assert [t.value for t in ds.tags] == ["evaluation"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert logged == {"plots/reliability_test_unbiased.png", "plots/confusion_test_unbiased.png",
                      "plots/feature_norms_test_unbiased.png", "plots/per_class_accuracy.png"}


def test_teacher_models_as_model_inputs(server: Server, finished: dict, tmp_path: Path) -> None:
    """The lineage tag teacher_run_id has MLflow 3's form too: the teacher run's logged model
    as a model input; a run id the store does not know is skipped without an outage."""
    tracker = Tracker(TrackingSpec(uri=server.uri, experiment="conventions"), enabled=True,
                      run_dir=tmp_path)
    run_id = tracker.start("student", {}, {"teacher_run_id": finished["run_id"]})
    tracker.log_model_inputs(finished["run_id"])
    tracker.log_model_inputs("0123456789abcdef0123456789abcdef")  # not in this store
    tracker.finish("FINISHED")
    assert not tracker.offline and not (tmp_path / BUFFER_NAME).exists()
    client = _client(server.uri)
    trained = client.get_run(finished["run_id"]).outputs.model_outputs
    assert len(trained) == 1
    got = client.get_run(run_id).inputs.model_inputs
    assert [m.model_id for m in got] == [trained[0].model_id]


def test_inputs_and_model_kept_through_an_outage(server: Server, demo_root: Path,
                                                 tmp_path: Path) -> None:
    """Server down: dataset inputs and the model go to the buffer (training goes on); the
    resend tool sends them, and the model then loads with the state file's logits."""
    from pipeline.data import build_index
    from pipeline.models import build_model
    from pipeline.track.conventions import TRAINING, dataset_input

    if not server.up:
        server.start()
    torch.manual_seed(1)
    state = tmp_path / "student.pt"
    torch.save(build_model("resnet8", 10).state_dict(), state)
    dead = f"http://127.0.0.1:{_free_port()}"
    tracker = Tracker(TrackingSpec(uri=dead, experiment="outage-conventions"), enabled=True,
                      run_dir=tmp_path)
    run_id = tracker.start("late", {}, {"kind": "unit"}, description="a run made later")
    spec_data = _spec_data(demo_root)
    tracker.log_inputs([dataset_input(build_index(spec_data, "train"), TRAINING, 32)])
    assert tracker.log_model(state, "resnet8", 10, 32) is False
    tracker.finish("FINISHED")
    records = read_records(tmp_path / BUFFER_NAME)
    assert [r["op"] for r in records] == ["create_run", "params", "inputs", "model", "terminated"]
    for r in records:
        r["uri"] = server.uri
    (tmp_path / BUFFER_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "run_info.json").write_text(json.dumps({"mlflow_run_id": run_id}))

    sent = _resend(tmp_path)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    real_id = json.loads((tmp_path / "run_info.json").read_text())["mlflow_run_id"]
    run = _client(server.uri).get_run(real_id)
    assert run.data.tags["mlflow.note.content"] == "a run made later"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["demo/train"]
    x = _demo_images(demo_root, 4)
    with torch.no_grad():
        got = _load_logged_model(server.uri, real_id)(x)
    assert torch.equal(got, _student_logits(state, x))


def _spec_data(demo_root: Path) -> Any:
    from pipeline.catalog import load_run_config

    return load_run_config(ROOT / "configs/demo/teacher.yaml", [f"data.root={demo_root}"]).data


@pytest.mark.slow
def test_run_page_screenshot(server: Server, finished: dict, tmp_path: Path) -> None:
    """The run's page in the MLflow UI renders (headless Chromium; look at the PNG once)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium, docker/apt-packages)")
    from PIL import Image

    if not server.up:
        server.start()
    run = _client(server.uri).get_run(finished["run_id"])
    url = (f"{server.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
           f"?{UI_QUERY}")
    shot = tmp_path / "run_page.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1400,1000", "--virtual-time-budget=15000", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and shot.exists(), out.stderr[-3000:]
    with Image.open(shot) as img:
        assert img.size == (1400, 1000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "a blank or near-blank page"
