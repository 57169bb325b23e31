"""SSKD against torchdistill 1.1.5 (``SSKDLoss`` for phase 2, ``AuxSSKDLoss`` for phase 1), on
the interleaved 4-rotation layout, with torchdistill's weight order [ce, kd, ss, tf]; the row
selection by hand; the teacher heads' loading, its errors and the lineage tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchdistill.losses.mid_level import AuxSSKDLoss, SSKDLoss

from pipeline.config import ConfigError
from pipeline.data.rotate import rotate_batch
from pipeline.distill.base import MethodContext
from pipeline.distill.sskd import (
    SSKD,
    SSKDOptions,
    SSKDTeacher,
    SSKDTeacherOptions,
    kept_rows,
    similarity_matrix,
    ss_pretrain_loss,
    sskd_terms,
)
from pipeline.types import Batch, ModelOutput, TeacherOutput

B, C, D = 6, 5, 8
TERMS = ("ce", "kd", "sskd_ss", "sskd_tf")  # torchdistill's order of loss_weights


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(4 * B, C, generator=g) * 3
    z_t = torch.randn(4 * B, C, generator=g) * 3
    u_s = torch.randn(4 * B, D, generator=g)
    u_t = torch.randn(4 * B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    return z_s, z_t, u_s, u_t, y


def _torchdistill(z_s, z_t, u_s, u_t, y, weights, o: SSKDOptions) -> torch.Tensor:
    loss = SSKDLoss("lin", "lin", "ss", "ss", kl_temp=o.T, ss_temp=o.ss_T, tf_temp=o.tf_T,
                    ss_ratio=o.ratio_ss, tf_ratio=o.ratio_tf, loss_weights=list(weights))
    student = {"lin": {"output": z_s}, "ss": {"output": u_s}}
    teacher = {"lin": {"output": z_t}, "ss": {"output": u_t}}
    return loss(student, teacher, y)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ratios", [(1.0, 0.75), (0.5, 0.25), (0.0, 1.0)])
def test_each_term_equals_torchdistill(seed: int, ratios: tuple[float, float]) -> None:
    z_s, z_t, u_s, u_t, y = _inputs(seed)
    base = SSKDOptions(ratio_tf=ratios[0], ratio_ss=ratios[1])
    for k, term in enumerate(TERMS):
        weights = [0.0] * 4
        weights[k] = 1.0
        o = SSKDOptions(ce_weight=weights[0], kd_weight=weights[1], ss_weight=weights[2],
                        tf_weight=weights[3], ratio_tf=base.ratio_tf, ratio_ss=base.ratio_ss)
        ours = sskd_terms(z_s, z_t, u_s, u_t, y, o)[term]
        ref = _torchdistill(z_s, z_t, u_s, u_t, y, weights, o)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6, msg=term)


def test_default_total_equals_torchdistill_weights_in_its_order() -> None:
    z_s, z_t, u_s, u_t, y = _inputs(3)
    o = SSKDOptions()  # CE 0.1, KD 0.9, tf 2.7, ss 10
    ours = sum(sskd_terms(z_s, z_t, u_s, u_t, y, o).values())
    ref = _torchdistill(z_s, z_t, u_s, u_t, y, [0.1, 0.9, 10.0, 2.7], o)  # [ce, kd, ss, tf]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_phase_one_equals_aux_sskd_loss() -> None:
    _, _, _, u_t, _ = _inputs(4)
    ref = AuxSSKDLoss(module_path="ss")({}, {"ss": {"output": u_t}})
    torch.testing.assert_close(ss_pretrain_loss(u_t), ref, rtol=1e-5, atol=1e-6)


def test_similarity_matrix_and_selection_by_hand() -> None:
    u = torch.tensor([[1.0, 0], [0, 1], [1, 1], [-1, 0],  # image 0: normal, then 3 rotated
                      [0, 2.0], [1, 0], [0, -1], [1, 1]])  # image 1
    s = similarity_matrix(u)
    assert s.shape == (6, 2)
    r2 = 2 ** -0.5
    expected = torch.tensor([[0, 1], [r2, r2], [-1, 0], [1, 0], [0, -1], [r2, r2]])
    torch.testing.assert_close(s, expected)
    # 2 correct rows (rank 0), 4 wrong: ratio 0.5 keeps the 2 wrong ones of rank 1
    mask = kept_rows(torch.tensor([0, 2, 1, 0, 3, 1]), 0.5)
    assert mask.tolist() == [True, False, True, True, False, True]
    assert kept_rows(torch.tensor([1, 2, 3]), 0.0).tolist() == [False, False, False]


def _ctx(load: bool = False) -> MethodContext:
    return MethodContext(num_classes=C, student_dim=D, teacher_dim=D, epochs=1,
                         steps_per_epoch=1, load_teacher=load)


def _batch() -> Batch:
    y = torch.arange(B) % C
    raw = Batch(torch.zeros(B, 3, 4, 4), y, torch.arange(B), torch.zeros(B, dtype=torch.long))
    return rotate_batch(raw, 4)


def test_method_runs_its_heads_and_equals_torchdistill(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher_phase = SSKDTeacher(SSKDTeacherOptions(), _ctx())
    path = tmp_path / "method.pt"
    torch.save(teacher_phase.state_dict(), path)
    (tmp_path / "run_info.json").write_text(json.dumps({"mlflow_run_id": "abc123"}))
    method = SSKD(SSKDOptions(teacher_heads=str(path)), _ctx(load=True)).train()
    assert not method.teacher_head.training and method.student_head.training
    assert all(not p.requires_grad for p in method.teacher_head.parameters())
    assert method.lineage_tags() == {"teacher_heads": str(path), "teacher_heads_run_id": "abc123"}
    z_s, z_t, h_s, h_t, _ = _inputs(5)
    batch = _batch()
    terms = method(ModelOutput(z_s, h_s), TeacherOutput(logits=z_t, embedding=h_t), batch)
    with torch.no_grad():
        u_s, u_t = method.student_head(h_s), teacher_phase.teacher_head(h_t)
    ref = _torchdistill(z_s, z_t, u_s, u_t, batch.labels[::4], [0.1, 0.9, 10.0, 2.7],
                        method.opts)
    torch.testing.assert_close(sum(terms.values()), ref, rtol=1e-5, atol=1e-6)
    phase1 = teacher_phase(None, TeacherOutput(embedding=h_t), batch)["ss_ce"]
    torch.testing.assert_close(phase1, ss_pretrain_loss(u_t), rtol=1e-6, atol=1e-7)
    assert 0.0 <= teacher_phase.epoch_metrics()["ss_top1"] <= 100.0


def test_heads_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method.teacher_heads: method 'sskd' needs"):
        SSKD(SSKDOptions(), _ctx(load=True))
    with pytest.raises(ConfigError, match="file not found"):
        SSKD(SSKDOptions(teacher_heads=str(tmp_path / "none.pt")), _ctx(load=True))
    wrong = MethodContext(num_classes=C, student_dim=D, teacher_dim=D + 1, epochs=1,
                          steps_per_epoch=1)
    torch.save(SSKDTeacher(SSKDTeacherOptions(), wrong).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="has shape"):
        SSKD(SSKDOptions(teacher_heads=str(tmp_path / "w.pt")), _ctx(load=True))
    torch.save({"embed.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="holds no teacher_head"):
        SSKD(SSKDOptions(teacher_heads=str(tmp_path / "other.pt")), _ctx(load=True))


def test_refuses_batches_without_rotations_and_bad_options() -> None:
    method = SSKD(SSKDOptions(), _ctx())
    z = torch.zeros(4, C)
    plain = Batch(torch.zeros(4, 3, 4, 4), torch.zeros(4, dtype=torch.long),
                  torch.arange(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="data.rotations: 4"):
        method(ModelOutput(z, torch.zeros(4, D)), TeacherOutput(z, torch.zeros(4, D)), plain)
    with pytest.raises(ValueError, match="ratio_ss"):
        SSKDOptions(ratio_ss=1.5)


def test_heads_of_another_teacher_are_refused(tmp_path: Path) -> None:
    """Same arch, other checkpoint (a CE- vs an MSE-trained teacher): refused by its sha256;
    a copy of the same checkpoint under another path is accepted."""
    import shutil

    for name, seed in (("a.pt", 0), ("b.pt", 1)):
        torch.manual_seed(seed)
        torch.save({"w": torch.randn(3)}, tmp_path / name)
    shutil.copy(tmp_path / "a.pt", tmp_path / "a_copy.pt")

    def ctx(weights: str, load: bool = True) -> MethodContext:
        return MethodContext(num_classes=C, student_dim=D, teacher_dim=D, epochs=1,
                             steps_per_epoch=1, load_teacher=load, teacher_arch="resnet8",
                             teacher_weights=str(tmp_path / weights))

    phase = SSKDTeacher(SSKDTeacherOptions(), ctx("a.pt"))
    assert phase.teacher_digest.any()
    torch.save(phase.state_dict(), tmp_path / "method.pt")
    opts = SSKDOptions(teacher_heads=str(tmp_path / "method.pt"))
    SSKD(opts, ctx("a_copy.pt"))  # the same teacher: fine
    with pytest.raises(ConfigError, match="trained on another teacher"):
        SSKD(opts, ctx("b.pt"))
    SSKD(opts, ctx("b.pt", load=False))  # a dry run reads no file
