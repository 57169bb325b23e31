"""AB and FT in real runs on the bundled data: the initial phase runs, resumes mid-phase to the
weights of an uninterrupted run, logs its own metrics, and what it trained is what the main
phase uses (AB's connectors and the student's feature layers, FT's frozen paraphraser).

Teachers are fixed random wrn_16_2 checkpoints, so the stage maps differ in width from the
resnet8 student's: AB gets ConvReg connectors, FT a translator from 64 to 64 factor channels.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_env, train_cmd

STEPS = 6
COMMON = ("optim.epochs=1", "optim.milestones=[]", f"train.max_steps_per_epoch={STEPS}",
          "train.progress=false", "train.deterministic=true", "train.log_every_steps=1",
          "data.eval_splits=[test_unbiased]")
PHASE = {"ab": ("init", "method.terms.ab.init_epochs=2"),
         "ft": ("paraphraser", "method.terms.ft.paraphraser_epochs=2")}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": build_model("wrn_16_2", 10).state_dict()}, path)
    return path


def _args(method: str, demo_root: Path, teacher: Path, *extra: str) -> tuple[str, ...]:
    return (f"data.root={demo_root}", "teacher.arch=wrn_16_2", f"teacher.weights={teacher}",
            *COMMON, PHASE[method][1], *extra)


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "student.pt", weights_only=True)
    method = run_dir / "method.pt"
    if method.exists():
        state.update({f"method.{k}": v for k, v in torch.load(method, weights_only=True).items()})
    return state


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _cut_in_phase(cmd: list[str], run_dir: Path, phase: str, how: signal.Signals) -> dict:
    """Start ``cmd``, and once a checkpoint inside ``phase`` exists send ``how``; the saved
    position when the process has ended."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                state = torch.load(ckpt, map_location="cpu", weights_only=False)
                if state["phase"] == phase:
                    proc.send_signal(how)
                    break
            time.sleep(0.05)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "student.pt").exists(), "the run was not cut"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if how == signal.SIGUSR1:
        assert proc.returncode == 75
    return state


@pytest.mark.slow
@pytest.mark.parametrize(("method", "how"), [("ab", signal.SIGUSR1), ("ft", signal.SIGKILL)])
def test_resume_mid_phase_matches_an_uninterrupted_run(
        method: str, how: signal.Signals, demo_root: Path, teacher_ckpt: Path,
        tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    phase = PHASE[method][0]
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracking = (f"tracking.uri={uri}", f"tracking.artifact_dir={tmp_path / 'art'}")
    args = _args(method, demo_root, teacher_ckpt, "train.checkpoint_every_steps=2", *tracking)
    cfg = f"configs/demo/{method}.yaml"
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(train_cmd(cfg, *args, run_dir=ref_dir), cwd=ROOT, env=run_env(), check=True,
                   capture_output=True, timeout=600)

    position = _cut_in_phase(train_cmd(cfg, *args, run_dir=cut_dir), cut_dir, phase, how)
    assert position["phase"] == phase and position["epoch"] < 2, position["epoch"]
    out = subprocess.run(train_cmd(cfg, *args, run_dir=cut_dir), cwd=ROOT, env=run_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout
    _assert_same(_state(ref_dir), _state(cut_dir))

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(json.loads((ref_dir / "run_info.json").read_text())["mlflow_run_id"])
    term = {"ab": "ab", "ft": "reconstruction"}[method]
    metrics = run.data.metrics
    assert {f"{phase}/train/{term}", f"{phase}/train/loss", f"{phase}/lr", "train/kd",
            "train/ce", "test_unbiased/top1"} <= metrics.keys()
    assert f"train/{term}" not in metrics and "train/ab" not in metrics
    assert run.data.params["phases"].startswith(f"{phase} 2 epoch(s) at lr ")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, f"{phase}/train/{term}")]
    assert steps == list(range(1, 2 * STEPS + 1))  # two phase epochs, logged every step
    main = [m.step for m in client.get_metric_history(run.info.run_id, "train/kd")]
    assert main == list(range(2 * STEPS + 1, 3 * STEPS + 1))  # then the main epoch


def _train_in_process(cfg: str, overrides: tuple[str, ...], run_dir: Path
                      ) -> tuple[dict, dict, dict]:
    """The distiller's state before training, when the main phase starts, and at the end."""
    from accelerate.state import AcceleratorState

    from pipeline.catalog import load_run_config
    from pipeline.train.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    spec = load_run_config(ROOT / cfg, [*overrides, f"run_dir={run_dir}",
                                        "tracking.enabled=false"])
    trainer = Trainer(spec)
    model = trainer.acc.unwrap_model(trainer.distiller)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    before, at_main = snapshot(), {}
    method = trainer.parts.method
    start = method.start_epoch

    def spy(epoch: int) -> None:
        if epoch == 0:
            at_main.update(snapshot())
        start(epoch)

    method.start_epoch = spy  # type: ignore[method-assign]
    trainer.fit()
    trainer.acc.end_training()
    return before, at_main, snapshot()


def _changed(a: dict, b: dict, prefix: str) -> set[str]:
    keys = [k for k in a if k.startswith(prefix) and a[k].is_floating_point()]
    assert keys, prefix
    return {k for k in keys if not torch.equal(a[k], b[k])}


def _keys(state: dict, prefix: str) -> set[str]:
    return {k for k in state if k.startswith(prefix) and state[k].is_floating_point()}


@pytest.mark.slow
def test_ab_init_trains_connectors_and_features_which_the_main_phase_keeps(
        demo_root: Path, teacher_ckpt: Path, tmp_path: Path) -> None:
    before, at_main, after = _train_in_process(
        "configs/demo/ab.yaml", _args("ab", demo_root, teacher_ckpt), tmp_path / "run")
    connectors = "method.terms.ab.connectors."
    assert _changed(before, at_main, connectors) == _keys(before, connectors)  # trained in init
    assert not _changed(at_main, after, connectors)  # frozen in the main phase (BN stats too)
    head = "student.fc."
    features = _keys(before, "student.") - _keys(before, head)
    weights = {k for k in features if "running" not in k}
    assert weights <= _changed(before, at_main, "student.")  # every feature layer moved in init
    assert not _changed(before, at_main, head)  # the classifier is not in the init phase
    assert _changed(at_main, after, head) == _keys(before, head)  # CE + KD train it afterwards


@pytest.mark.slow
def test_ft_paraphraser_is_trained_alone_then_frozen(demo_root: Path, teacher_ckpt: Path,
                                                     tmp_path: Path) -> None:
    before, at_main, after = _train_in_process(
        "configs/demo/ft.yaml", _args("ft", demo_root, teacher_ckpt), tmp_path / "run")
    para, trans = "method.terms.ft.paraphraser.", "method.terms.ft.translator."
    assert _changed(before, at_main, para) == _keys(before, para)
    assert not _changed(at_main, after, para)  # frozen: the weights the phase ended with
    assert not _changed(before, at_main, "student.")  # the student is not run in the phase
    assert not _changed(before, at_main, trans)
    trans_weights = {k for k in _keys(before, trans) if "running" not in k}
    assert trans_weights <= _changed(at_main, after, trans)  # trained with the student
    assert _changed(at_main, after, "student.")


@pytest.mark.parametrize(("method", "phase"), [("ab", "init"), ("ft", "paraphraser")])
def test_cached_teacher_gives_the_online_first_step_losses(
        method: str, phase: str, teacher_ckpt: Path, tmp_path: Path) -> None:
    """A cache written by launch/cache_teacher.py holds just the method's stages (pre-activation
    for AB) and gives the first-step losses of the online teacher, in both phases (fp16)."""
    from launch.cache_teacher import main as cache_main
    from pipeline.catalog import load_run_config
    from pipeline.data import AugPlan, to_device
    from pipeline.data.loader import build_train_loader
    from pipeline.teacher.cache_format import Manifest
    from pipeline.train.build import build_parts
    from pipeline.train.distiller import Distiller

    cfg, cache = ROOT / f"configs/demo/{method}.yaml", tmp_path / "cache"
    sets = ["data.dataset=synthetic", "data.synthetic_size=32", "data.batch_size=16",
            "data.views=2", "teacher.arch=wrn_16_2", f"teacher.weights={teacher_ckpt}",
            f"teacher.cache_dir={cache}", f"run_dir={tmp_path / 'run'}"]
    assert cache_main(["--cfg", str(cfg), *[a for s in sets for a in ("--set", s)]]) == 0
    manifest = Manifest.load(cache)
    assert manifest.stages == ([1, 2, 3] if method == "ab" else [3])
    assert manifest.teacher["preact"] is (method == "ab")

    losses = {}
    for source in ("online", "cached"):
        spec = load_run_config(cfg, [*sets, f"teacher.source={source}"])
        torch.manual_seed(0)
        parts = build_parts(spec, steps_per_epoch=2)
        distiller = Distiller(parts.student, parts.method).train()
        plan = AugPlan.from_spec(spec.data, spec.seed)
        raw = next(iter(build_train_loader(parts.train_index, spec.data, plan, 0, spec.seed, 0, 1)))
        batch = to_device(raw, "cpu", spec.data.mean, spec.data.std)
        for name in (phase, "main"):
            parts.method.set_phase(name)
            distiller.run_student = name == "main" or method == "ab"
            with torch.no_grad():
                losses[source, name] = distiller(batch.images, parts.teacher(raw, batch.images),
                                                 batch)
    for name in (phase, "main"):
        online, cached = losses["online", name], losses["cached", name]
        assert online.keys() == cached.keys() and online
        for k in online:
            torch.testing.assert_close(cached[k], online[k], rtol=5e-3, atol=1e-4)
