"""Evaluation metrics against hand-computed values and naive float64 loop implementations."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluate.gather import dedup_by_index, gather_eval
from pipeline.evaluate.metrics import aurc, eaurc, ece, evaluate_all, nll, topk_accuracy


def naive_probs(scores: torch.Tensor, from_logits: bool) -> list[list[float]]:
    rows = scores.double().tolist()
    if not from_logits:
        return rows
    out = []
    for row in rows:
        m = max(row)
        e = [math.exp(v - m) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def naive_conf_correct(scores: torch.Tensor, labels: torch.Tensor, from_logits: bool):
    conf, correct = [], []
    for row, y in zip(naive_probs(scores, from_logits), labels.tolist(), strict=True):
        best = max(range(len(row)), key=lambda c: row[c])  # first maximum, like argmax
        conf.append(row[best])
        correct.append(1.0 if best == y else 0.0)
    return conf, correct


def naive_ece(scores, labels, n_bins, from_logits=True) -> float:
    conf, correct = naive_conf_correct(scores, labels, from_logits)
    n, total = len(conf), 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        members = [j for j in range(n) if lo < conf[j] <= hi]
        if members:
            acc = sum(correct[j] for j in members) / len(members)
            avg = sum(conf[j] for j in members) / len(members)
            total += len(members) / n * abs(acc - avg)
    return total


def naive_aurc(scores, labels, from_logits=True) -> tuple[float, float]:
    conf, correct = naive_conf_correct(scores, labels, from_logits)
    n = len(conf)
    order = sorted(range(n), key=lambda j: -conf[j])  # stable: ties keep input order
    risks, errors = [], 0
    for k, j in enumerate(order, start=1):
        errors += 1 - int(correct[j])
        risks.append(errors / k)
    value = sum(risks) / n
    n_err = n - int(sum(correct))
    best = sum(max(0, k - (n - n_err)) / k for k in range(1, n + 1)) / n
    return value, value - best


# Four samples, two classes; confidences 0.9 (right), 0.85 (wrong), 0.7 (right), 0.65 (right).
HAND_PROBS = torch.tensor([[0.9, 0.1], [0.85, 0.15], [0.3, 0.7], [0.65, 0.35]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 1, 1, 0])


def test_ece_hand() -> None:
    # 5 bins: (0.8, 1] holds 0.9 ✓ and 0.85 ✗: acc 1/2, conf 0.875, gap 0.375, weight 1/2.
    # (0.6, 0.8] holds 0.7 ✓ and 0.65 ✓: acc 1, conf 0.675, gap 0.325, weight 1/2.
    assert ece(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(0.35)
    logits = HAND_PROBS.log()
    assert ece(logits, HAND_LABELS, n_bins=5) == pytest.approx(0.35)
    assert ece(HAND_PROBS, HAND_LABELS, n_bins=5, from_logits=False) == pytest.approx(0.35)


def test_ece_bin_edges_are_right_closed() -> None:
    # Confidence exactly 0.6 falls in (0.4, 0.6], exactly 1.0 in the last bin.
    probs = torch.tensor([[0.6, 0.4], [1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0])  # first wrong, second right
    # bin (0.4, 0.6]: acc 0, conf 0.6 → 0.6·1/2; bin (0.8, 1]: acc 1, conf 1 → 0.
    assert ece(probs, labels, n_bins=5) == pytest.approx(0.3)
    assert ece(probs, labels, n_bins=5) == pytest.approx(naive_ece(probs, labels, 5, False))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_naive_random(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(200, 6, generator=g) * 2
    labels = torch.randint(0, 6, (200,), generator=g)
    for n_bins in (15, 10, 1):
        assert ece(logits, labels, n_bins) == pytest.approx(naive_ece(logits, labels, n_bins))


def test_aurc_hand() -> None:
    # Ranked ✓ ✗ ✓ ✓: risks 0, 1/2, 1/3, 1/4. Optimal ✓ ✓ ✓ ✗: 0, 0, 0, 1/4.
    want = (0 + 1 / 2 + 1 / 3 + 1 / 4) / 4
    assert aurc(HAND_PROBS, HAND_LABELS) == pytest.approx(want)
    assert eaurc(HAND_PROBS, HAND_LABELS) == pytest.approx(want - 1 / 16)


def test_aurc_perfect_ranking_and_all_correct() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])  # the least confident is the only error
    assert eaurc(probs, labels) == pytest.approx(0.0)
    assert aurc(probs, labels) == pytest.approx((1 / 3) / 3)
    assert aurc(probs, torch.tensor([0, 0, 0])) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aurc_matches_naive_random(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(150, 5, generator=g) * 2
    labels = torch.randint(0, 5, (150,), generator=g)
    want_aurc, want_eaurc = naive_aurc(logits, labels)
    assert aurc(logits, labels) == pytest.approx(want_aurc)
    assert eaurc(logits, labels) == pytest.approx(want_eaurc)
    assert eaurc(logits, labels) >= 0


def test_aurc_ties_keep_input_order() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    # argmax picks class 0 for both; the first is wrong, the second right.
    assert aurc(probs, torch.tensor([1, 0])) == pytest.approx((1 + 1 / 2) / 2)
    assert aurc(probs, torch.tensor([0, 1])) == pytest.approx((0 + 1 / 2) / 2)


def test_topk_hand() -> None:
    logits = torch.tensor(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 0: top-1 ✓
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 4: top-5 ✓ only
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 5: neither
            [0.0, 1.0, 9.0, 2.0, 3.0, 4.0],  # label 2: top-1 ✓
        ]
    )
    labels = torch.tensor([0, 4, 5, 2])
    assert topk_accuracy(logits, labels) == {"top1": 50.0, "top5": 75.0}
    assert topk_accuracy(logits, labels, ks=(2,)) == {"top2": 50.0}


def test_topk_clips_k_to_classes() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.2, 0.1]])
    assert topk_accuracy(logits, torch.tensor([0, 2])) == {"top1": 0.0, "top5": 100.0}


def test_nll_matches_naive() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 4, generator=g)
    labels = torch.randint(0, 4, (20,), generator=g)
    probs = naive_probs(logits, True)
    want = -sum(math.log(p[y]) for p, y in zip(probs, labels.tolist(), strict=True)) / 20
    assert nll(logits, labels) == pytest.approx(want)


def test_evaluate_all_consistent() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(300, 10, generator=g) * 3
    labels = torch.randint(0, 10, (300,), generator=g)
    got = evaluate_all(logits, labels)
    assert set(got) == {"top1", "top5", "nll", "ece", "aurc", "eaurc"}
    assert all(isinstance(v, float) for v in got.values())
    assert got["top1"] == pytest.approx(topk_accuracy(logits, labels)["top1"])
    assert got["top5"] == pytest.approx(topk_accuracy(logits, labels)["top5"])
    assert got["nll"] == pytest.approx(nll(logits, labels))
    assert got["ece"] == pytest.approx(naive_ece(logits, labels, 15))
    assert (got["aurc"], got["eaurc"]) == pytest.approx(naive_aurc(logits, labels))
    # fp16 logits, as read from a cache, are accepted.
    assert evaluate_all(logits.half(), labels)["top1"] == pytest.approx(got["top1"], abs=1.0)


def test_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="labels in"):
        evaluate_all(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="N = 0"):
        ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="expected scores"):
        aurc(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_gather_eval_single_process_drops_pads_and_duplicates() -> None:
    logits = torch.arange(12.0).view(6, 2)
    labels = torch.tensor([1, 0, 1, 9, 1, 0])
    index = torch.tensor([4, 2, -1, 2, 0, -1])
    out_logits, out_labels = gather_eval(logits, labels, index)
    torch.testing.assert_close(out_logits, torch.tensor([[8.0, 9.0], [2.0, 3.0], [0.0, 1.0]]))
    assert out_labels.tolist() == [1, 0, 1]
    assert dedup_by_index(logits, labels, index)[2].tolist() == [0, 2, 4]
