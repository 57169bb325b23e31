"""PS-KD: the loss against a transcription of the code's soft-target CE, the stored predictions
against a recomputation of the training forward passes, the buffer in checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.catalog import load_run_config
from pipeline.data import AugPlan, build_index, to_device
from pipeline.data.loader import build_train_loader
from pipeline.distill.base import MethodContext
from pipeline.distill.pskd import PSKD, PSKDOptions, first_of_each
from pipeline.models import build_model
from pipeline.train.distiller import Distiller
from pipeline.types import Batch, ModelOutput

C, N = 5, 12


def _ctx(epochs: int = 4, n: int = N) -> MethodContext:
    labels = torch.arange(n) % C
    return MethodContext(num_classes=C, student_dim=3, teacher_dim=None, epochs=epochs,
                         steps_per_epoch=2, num_train_samples=n, train_labels=labels)


def _batch(index: list[int]) -> Batch:
    idx = torch.tensor(index)
    return Batch(torch.zeros(len(idx), 3, 2, 2), idx % C, idx, torch.zeros_like(idx))


def _code_loss(logits, labels, previous, alpha):
    """The code's soft target and ``Custom_CrossEntropy_PSKD``: (−t·log σ(z)).mean(0).sum()."""
    target = (1 - alpha) * torch.eye(C)[labels] + alpha * previous
    return (-target * F.log_softmax(logits, dim=1)).mean(0).sum()


def test_terms_sum_to_the_codes_loss_and_alpha_grows() -> None:
    method = PSKD(PSKDOptions(), _ctx(epochs=4))
    g = torch.Generator().manual_seed(0)
    previous = F.softmax(torch.randn(N, C, generator=g), dim=1)
    method.predictions.copy_(previous)
    method.start_epoch(2)
    assert method.alpha_t == pytest.approx(0.8 * 3 / 4)
    z = torch.randn(4, C, generator=g, requires_grad=True)
    batch = _batch([7, 2, 11, 0])
    terms = method(ModelOutput(z, torch.zeros(4, 3)), None, batch)
    ref = _code_loss(z.detach(), batch.labels, previous[batch.index], method.alpha_t)
    torch.testing.assert_close(terms["ce"] + terms["pskd"], ref, rtol=1e-6, atol=1e-6)
    # the rows were read before being overwritten with this step's σ(z)
    torch.testing.assert_close(method.predictions[batch.index], F.softmax(z.detach(), dim=1))
    untouched = [i for i in range(N) if i not in (7, 2, 11, 0)]
    assert torch.equal(method.predictions[untouched], previous[untouched])
    sum(terms.values()).backward()
    assert z.grad is not None


def test_first_epoch_trains_on_one_hot_and_eval_stores_nothing() -> None:
    method = PSKD(PSKDOptions(buffer_dtype="float16"), _ctx())
    assert torch.equal(method.predictions.float(), torch.eye(C)[torch.arange(N) % C])
    z = torch.randn(3, C)
    batch = _batch([1, 4, 4])  # a repeated sample keeps its first row
    method.eval()
    terms = method(ModelOutput(z, torch.zeros(3, 3)), None, batch)
    ref = _code_loss(z, batch.labels, torch.eye(C)[batch.labels], method.alpha_t)
    torch.testing.assert_close(terms["ce"] + terms["pskd"], ref)
    assert torch.equal(method.predictions.float(), torch.eye(C)[torch.arange(N) % C])
    method.train()
    method(ModelOutput(z, torch.zeros(3, 3)), None, batch)
    assert method.predictions.dtype == torch.float16
    torch.testing.assert_close(method.predictions[4].float(), F.softmax(z[1], 0), atol=1e-3,
                               rtol=0)
    rows, first = first_of_each(torch.tensor([4, 1, 4, 9, 1]))
    assert rows.tolist() == [1, 4, 9] and first.tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="needs the training labels"):
        PSKD(PSKDOptions(), MethodContext(C, 3, None, 1, 1))


SPEC = """\
name: pskd-test
data: {{dataset: synthetic, synthetic_size: 20, augment: cifar, image_size: 32, batch_size: 6,
       eval_batch_size: 6, workers: 0, views: 0, num_classes: 10}}
model: {{arch: resnet8}}
method: {{name: pskd}}
optim: {{epochs: 3}}
tracking: {{enabled: false}}
"""


def test_stored_predictions_are_the_training_forward_of_that_epoch(tmp_path) -> None:
    """After epoch 0, each visited row holds σ(student(x)) recomputed from the weights before
    that step, in train mode, on the epoch-0 view the plan gives; unvisited rows stay one-hot."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(SPEC.format())
    spec = load_run_config(cfg)
    index = build_index(spec.data, "train")
    plan = AugPlan.from_spec(spec.data, spec.seed)
    labels = torch.from_numpy(index.labels)
    ctx = MethodContext(num_classes=10, student_dim=64, teacher_dim=None, epochs=3,
                        steps_per_epoch=3, num_train_samples=len(index), train_labels=labels)
    torch.manual_seed(0)
    model = Distiller(build_model("resnet8", 10), PSKD(PSKDOptions(), ctx)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def batches(epoch: int):
        for raw in build_train_loader(index, spec.data, plan, epoch, spec.seed, 0, 1):
            yield to_device(raw, "cpu", spec.data.mean, spec.data.std)

    snapshots = []
    model.method.start_epoch(0)
    for batch in batches(0):
        snapshots.append(copy.deepcopy(model.student.state_dict()))
        loss = sum(model(batch.images, None, batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    stored = model.method.predictions.clone()
    check = build_model("resnet8", 10).train()
    visited = set()
    for state, batch in zip(snapshots, batches(0), strict=True):  # the loader rebuilt: same views
        check.load_state_dict(state)
        with torch.no_grad():
            expected = F.softmax(check(batch.images).logits, dim=1)
        torch.testing.assert_close(stored[batch.index], expected, rtol=1e-5, atol=1e-6)
        visited |= set(batch.index.tolist())
    assert len(visited) == 18  # 20 samples, 3 full batches of 6: 2 left out this epoch
    rest = [i for i in range(len(index)) if i not in visited]
    assert torch.equal(stored[rest], F.one_hot(labels[rest], 10).float())
    # epoch 1 trains against exactly those rows
    model.method.start_epoch(1)
    batch = next(batches(1))
    z = model.student(batch.images).logits.detach()
    terms = model(batch.images, None, batch)
    ref = _code_loss_n(z, batch.labels, stored[batch.index], model.method.alpha_t, 10)
    torch.testing.assert_close(terms["ce"] + terms["pskd"], ref, rtol=1e-4, atol=1e-5)


def _code_loss_n(logits, labels, previous, alpha, classes):
    target = (1 - alpha) * torch.eye(classes)[labels] + alpha * previous
    return (-target * F.log_softmax(logits, dim=1)).mean(0).sum()


def test_buffer_travels_in_the_state_dict() -> None:
    a, b = PSKD(PSKDOptions(), _ctx()), PSKD(PSKDOptions(), _ctx())
    a(ModelOutput(torch.randn(3, C), torch.zeros(3, 3)), None, _batch([0, 5, 6]))
    assert not torch.equal(a.predictions, b.predictions)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.predictions, b.predictions)


@pytest.mark.slow
def test_resume_after_sigkill_restores_the_buffer(demo_root, tmp_path) -> None:
    """Killed after its first epoch and resumed, a run ends with the same weights and the same
    prediction buffer, bit for bit, as an uninterrupted one (mid-run state comes from last.pt)."""
    import signal
    import subprocess
    import time

    from tests.conftest import ROOT, run_env, train_cmd

    args = (f"data.root={demo_root}", "optim.epochs=3", "optim.milestones=[2]",
            "train.max_steps_per_epoch=4", "train.eval_every=10", "train.progress=false",
            "train.deterministic=true", "tracking.enabled=false")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(train_cmd("configs/demo/pskd.yaml", *args, run_dir=ref_dir), cwd=ROOT,
                   env=run_env(), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(train_cmd("configs/demo/pskd.yaml", *args, run_dir=cut_dir),
                            cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = cut_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (cut_dir / "student.pt").exists(), "the run was not cut mid-way"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    written = (state["method.predictions"].max(dim=1).values < 1).sum()
    assert written > 0, "the checkpoint holds no stored predictions"
    out = subprocess.run(train_cmd("configs/demo/pskd.yaml", *args, run_dir=cut_dir), cwd=ROOT,
                         env=run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "resuming" in out.stdout, out.stderr[-3000:]
    for name in ("student.pt", "method.pt"):
        ref = torch.load(ref_dir / name, weights_only=True)
        cut = torch.load(cut_dir / name, weights_only=True)
        assert ref.keys() == cut.keys()
        for k in ref:
            assert torch.equal(ref[k], cut[k]), (name, k)
