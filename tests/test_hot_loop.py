"""What keeps the GPU step free of host waits, checked on the CPU: CPU checkpoints, RNG per
device, normalisation tensors made once, stop agreement every N steps, the online teacher's
one-time cast, the cached teacher's read-ahead, compilation that leaves training unchanged."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import device as device_mod
from pipeline.data.device import norm_tensors, pinned_copy, to_device
from pipeline.train import checkpoint
from pipeline.train.signals import StopFlag, is_agreement_step
from pipeline.types import Batch, TeacherOutput
from tests.conftest import PY, ROOT, run_env, train_cmd


def test_to_cpu_moves_every_tensor_and_keeps_state_dict_metadata() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = model.state_dict()
    state = {"model": sd, "opt": {"state": {0: {"momentum_buffer": torch.ones(3)}}},
             "rng": [(1, torch.zeros(2))], "step": 7, "name": "x"}
    moved = checkpoint.to_cpu(state)
    assert isinstance(moved["model"], OrderedDict)
    assert moved["model"]._metadata == sd._metadata  # BatchNorm's version survives
    assert moved["step"] == 7 and moved["name"] == "x" and isinstance(moved["rng"][0], tuple)


def test_saved_files_hold_cpu_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``atomic_save`` calls ``.cpu()`` on every tensor, nested ones included."""
    seen = []
    real = torch.Tensor.cpu

    def spy(self, *a, **k):
        seen.append(tuple(self.shape))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", spy)
    checkpoint.atomic_save({"a": torch.ones(2, 3), "b": [torch.zeros(4)]}, tmp_path / "x.pt")
    assert sorted(seen) == [(2, 3), (4,)]
    loaded = torch.load(tmp_path / "x.pt", weights_only=True)
    assert loaded["a"].device.type == "cpu"


def test_rng_state_holds_the_current_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saved by a process that saw 8 GPUs (old format: all of them), restored where 1 is seen."""
    gens = {i: torch.tensor([i], dtype=torch.uint8) for i in range(8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda i=0: gens[i].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i=0: restored.__setitem__(i, s))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("all GPUs saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("all restored"))
    state = checkpoint.rng_state(torch.device("cuda", 3))
    assert int(state["cuda_device"][0]) == 3 and "cuda" not in state
    checkpoint.set_rng_state(state, torch.device("cuda", 0))
    assert int(restored[0][0]) == 3  # this process's generator went to this process's device
    legacy = {**state, "cuda": [gens[i] for i in range(8)]}
    del legacy["cuda_device"]
    restored.clear()
    checkpoint.set_rng_state(legacy, torch.device("cuda", 0))  # one GPU visible now
    assert list(restored) == [0] and int(restored[0][0]) == 0
    checkpoint.set_rng_state(state, torch.device("cpu"))  # a CPU process ignores CUDA states


def test_norm_tensors_are_made_once_and_keep_channels_last() -> None:
    device_mod._NORM.clear()
    m1, s1 = norm_tensors(torch.device("cpu"), [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    m2, s2 = norm_tensors(torch.device("cpu"), [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    assert m1 is m2 and s1 is s2 and len(device_mod._NORM) == 1
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    batch = Batch(images, torch.zeros(2, dtype=torch.int64), torch.arange(2), torch.zeros(2))
    out = to_device(batch, "cpu", [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], channels_last=True)
    assert out.images.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean.double()) / 0.2
    assert torch.allclose(out.images.double(), expected, atol=1e-5)
    plain = to_device(batch, "cpu", [0.5, 0.4, 0.3], [0.2, 0.2, 0.2])
    assert torch.equal(plain.images, out.images)


def test_pinned_copy_keeps_strides_and_values() -> None:
    src = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    out = pinned_copy(src, pin=False)
    assert out.stride() == src.stride() and torch.equal(out, src)
    assert out.data_ptr() != src.data_ptr()


def test_stop_agreement_steps() -> None:
    assert [s for s in range(1, 13) if is_agreement_step(s, 5, s == 12)] == [5, 10, 12]
    assert all(is_agreement_step(s, 1, False) for s in range(1, 5))
    with pytest.raises(ValueError, match="stop_check_every_steps"):
        is_agreement_step(3, 0, False)
    flag = StopFlag()  # one process: its own flag at every step, no agreement needed
    assert not flag.check(3, 50)
    flag._local = True
    assert flag.check(3, 50) and flag.requested


def test_online_teacher_cast_equals_autocast() -> None:
    """Frozen conv/linear weights cast once = what autocast makes of them at every call."""
    from pipeline.models import build_model
    from pipeline.teacher.online import OnlineTeacher

    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    teacher = OnlineTeacher(model, ("logits", "embedding"))
    teacher.to(torch.device("cpu"), dtype=torch.bfloat16)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert conv.weight.dtype == torch.bfloat16 and bn.weight.dtype == torch.float32
    batch = Batch(x, torch.zeros(4, dtype=torch.int64), torch.arange(4), torch.zeros(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher(batch, x)
    assert torch.equal(got.logits, ref.logits) and torch.equal(got.embedding, ref.embedding)
    # The student's memory format: other kernels (summation order), the same values nearly.
    teacher.to(torch.device("cpu"), channels_last=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        last = teacher(batch, x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(last.logits.float(), ref.logits.float(), atol=0.05, rtol=0.05)


def test_place_teacher_keeps_float32_on_cpu() -> None:
    from pipeline.models import build_model
    from pipeline.teacher.online import OnlineTeacher
    from pipeline.train.hot_loop import autocast_dtype

    assert autocast_dtype("bf16", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("no", torch.device("cuda")) is None
    teacher = OnlineTeacher(build_model("resnet8", 10), ("logits",))
    teacher.to(torch.device("cpu"), dtype=autocast_dtype("bf16", torch.device("cpu")))
    assert all(p.dtype == torch.float32 for p in teacher.model.parameters())


class _Rows:
    """A cached-teacher stand-in: logits = index·10 + view, and a count of lookups."""

    fields = ("logits",)
    embedding_dim = 3

    def __init__(self) -> None:
        self.lookups = 0
        self.device = torch.device("cpu")

    def to(self, device):
        self.device = device
        return self

    def lookup(self, index, view, device=None):
        self.lookups += 1
        time.sleep(0.01)
        return TeacherOutput(logits=(index * 10 + view).float()[:, None].to(device or "cpu"))

    def __call__(self, batch, images=None):
        return self.lookup(batch.index, batch.view)


def _batches(n: int) -> list[Batch]:
    return [Batch(torch.zeros(2, 3, 1, 1), torch.zeros(2, dtype=torch.int64),
                  torch.tensor([2 * k, 2 * k + 1]), torch.tensor([1, 1])) for k in range(n)]


def test_read_ahead_serves_the_same_rows_ahead_of_the_step() -> None:
    from pipeline.teacher.prefetch import ReadAhead

    source = _Rows()
    ahead = ReadAhead(source, 2)
    batches = _batches(6)
    seen = []
    for b in ahead.read_ahead(batches):
        seen.append(b)
        if len(seen) == 1:  # the rows of the next two batches are being read already
            assert len(ahead._pending) == 3
        assert torch.equal(ahead(b, b.images).logits, source.lookup(b.index, b.view).logits)
    assert seen == batches and ahead.hits == 6 and ahead.misses == 0
    stray = _batches(1)[0]  # not read ahead: looked up directly
    assert torch.equal(ahead(stray).logits, source(stray).logits) and ahead.misses == 1
    assert ahead.embedding_dim == 3 and ahead.fields == ("logits",)  # the source's attributes
    for _ in ahead.read_ahead(_batches(10)):  # stopped early: nothing left pending
        break
    assert not ahead._pending
    ahead.close()


def _tiny_config(tmp_path: Path, name: str, compile_: bool) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"name: {name}\nrun_dir: {tmp_path / name}\ndata:\n  dataset: synthetic\n"
        "  synthetic_size: 32\n  augment: cifar\n  batch_size: 8\n  eval_batch_size: 16\n"
        "  workers: 0\nmodel:\n  arch: resnet8\nmethod:\n  name: vanilla\n"
        "optim:\n  epochs: 1\n  milestones: []\ntrain:\n  progress: false\n  cpu: true\n"
        f"  deterministic: true\n  compile: {str(compile_).lower()}\n"
        "tracking:\n  enabled: false\n")
    return cfg


def test_compile_warm_up_leaves_training_unchanged(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile``: the modules are compiled (dynamo's eager backend here: inductor needs
    minutes on this CPU; tests/test_gpu.py compiles for real), the warm-up's time is reported,
    and the weights trained are those of the run without compilation."""
    from accelerate.state import AcceleratorState

    from pipeline.catalog import load_run_config
    from pipeline.train.trainer import Trainer

    compiled = []
    real = torch.nn.Module.compile

    def eager(self, *args, **kwargs):
        compiled.append(type(self).__name__)
        return real(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager)
    weights = {}
    for flag in (False, True):
        AcceleratorState._reset_state(reset_partial_state=True)
        trainer = Trainer(load_run_config(_tiny_config(tmp_path, f"c{int(flag)}", flag)))
        assert (trainer.compile_s is not None) == flag
        trainer.fit()
        weights[flag] = torch.load(trainer.run_dir / "student.pt", weights_only=True)
    assert compiled == ["CifarResNet"]  # the student only: vanilla has no teacher
    for k, v in weights[False].items():
        assert torch.equal(v, weights[True][k]), k


def test_fused_sgd_on_request() -> None:
    from pipeline.config.schema import OptimSpec
    from pipeline.distill.vanilla import Vanilla  # noqa: F401  (the registry)
    from pipeline.train.optim import build_optimizer

    net = torch.nn.Linear(3, 2)
    method = torch.nn.Module()
    method.no_decay_parameters = lambda: []  # type: ignore[method-assign]
    assert build_optimizer(net, method, OptimSpec()).defaults["fused"] is None
    assert build_optimizer(net, method, OptimSpec(), fused=True).defaults["fused"] is True


def test_two_processes_stop_at_the_same_agreed_step(demo_root: Path, tmp_path: Path) -> None:
    """SIGUSR1 to ONE of two gloo processes: both checkpoint at the next multiple of
    ``train.stop_check_every_steps`` (not at the signal's step) and stop with exit 75."""
    import psutil

    run_dir = tmp_path / "run"
    every = 4
    cmd = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           *train_cmd("configs/demo/vanilla.yaml", f"data.root={demo_root}", "optim.epochs=2",
                      "train.max_steps_per_epoch=30", "train.progress=false",
                      "tracking.enabled=false", f"train.stop_check_every_steps={every}",
                      run_dir=run_dir)[1:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch 1/"):
                workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                           if any("train.py" in a for a in p.cmdline())]
                assert len(workers) == 2, workers
                workers[-1].send_signal(signal.SIGUSR1)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=False)
    assert state["epoch"] == 1 and 0 < state["step"] < 30, out[-2000:]
    assert state["step"] % every == 0, f"stopped at step {state['step']}, not an agreed step"
    assert "stopped by signal" in out and not (run_dir / "student.pt").exists()
    assert json.loads(json.dumps(state["world_size"])) == 2
    np.testing.assert_equal(len(state["rng"]), 2)
