"""Evaluation metrics over a whole evaluation set (pure functions on full-dataset tensors).

Compute these on the gathered, deduplicated outputs (``pipeline.evaluate.gather.gather_eval``),
never as a mean of per-process or per-batch values: ECE and AURC do not decompose over batches.

All results are Python floats. Accuracies are in percent; NLL in nats; ECE, AURC and E-AURC are
fractions in [0, 1] (papers often print AURC and E-AURC ×1000).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.evaluate.gather import gather_eval  # re-exported: the step before these metrics


def _check(scores: Tensor, labels: Tensor, where: str) -> None:
    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{where}: expected scores (N, C) and labels (N,), found {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError(f"{where}: expected at least one sample, found N = 0")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= scores.shape[1]:
        raise ValueError(
            f"{where}: expected labels in [0, {scores.shape[1]}), found values in [{lo}, {hi}]"
        )


def _looks_like_probs(x: Tensor) -> bool:
    """True when every row is non-negative, at most 1 and sums to 1 (within 1e-3)."""
    if not x.is_floating_point() or x.min() < 0 or x.max() > 1:
        return False
    return bool(
        torch.allclose(x.double().sum(dim=1), torch.ones((), dtype=torch.float64), atol=1e-3)
    )


def _probs(probs_or_logits: Tensor, from_logits: bool | None) -> Tensor:
    """Float64 class probabilities; ``from_logits=None`` detects probabilities by their rows."""
    if from_logits is None:
        from_logits = not _looks_like_probs(probs_or_logits)
    if from_logits:
        return F.softmax(probs_or_logits.double(), dim=1)
    return probs_or_logits.double()


def _confidence_correct(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Max-probability confidence (float64) and 0/1 correctness of the argmax prediction."""
    conf, pred = probs.max(dim=1)
    return conf, (pred == labels.to(pred.device)).double()


def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent, as ``{"top1": ..., "top5": ...}``.

    A sample counts as correct when its label is among the k highest scores. k is clipped to the
    number of classes C (top-5 of a 3-class problem is top-3, i.e. 100 %) but the key keeps the
    requested k, so every run logs the same names. Ties are broken by ``torch.topk``.
    """
    _check(logits, labels, "topk_accuracy")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax), best first
    hit = top == labels.to(top.device).view(-1, 1)
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"topk_accuracy: expected k >= 1, found {k}")
        kk = min(k, logits.shape[1])
        out[f"top{k}"] = 100.0 * hit[:, :kk].any(dim=1).double().mean().item()
    return out


def nll(logits: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood −(1/N)·Σ_n log σ(z_n)_{y_n}, in nats (float64)."""
    _check(logits, labels, "nll")
    return F.cross_entropy(logits.double(), labels.long().to(logits.device)).item()


def _ece(conf: Tensor, correct: Tensor, n_bins: int) -> float:
    # Bin i holds confidences in (i/n, (i+1)/n]; bucketize(right=False) over the interior
    # edges i/n (i = 1..n-1) returns exactly that i. Edges are float64 i/n as in a Python loop.
    edges = torch.arange(1, n_bins, dtype=torch.float64, device=conf.device) / n_bins
    bins = torch.bucketize(conf, edges, right=False)
    gap = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    gap.index_add_(0, bins, correct - conf)  # Σ_{b∈B_i} (correct_b − conf_b) = |B_i|·(acc − conf)
    return (gap.abs().sum() / conf.numel()).item()


def ece(
    probs_or_logits: Tensor, labels: Tensor, n_bins: int = 15, from_logits: bool | None = None
) -> float:
    """Expected calibration error, a fraction in [0, 1].

    Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3 (after Naeini et al.
    2015): ECE = Σ_i (|B_i|/N)·|acc(B_i) − conf(B_i)|, over ``n_bins`` equal-width confidence bins,
    bin i holding the samples whose confidence lies in (i/n_bins, (i+1)/n_bins]. Confidence is the
    max softmax probability and the prediction its argmax.

    Args:
        probs_or_logits: (N, C) logits or probabilities.
        labels: (N,) class indices.
        n_bins: number of bins (15 as in Guo et al.).
        from_logits: True for logits, False for probabilities, None to detect (rows in [0, 1]
            summing to 1 are taken as probabilities).
    """
    _check(probs_or_logits, labels, "ece")
    if n_bins < 1:
        raise ValueError(f"ece: expected n_bins >= 1, found {n_bins}")
    conf, correct = _confidence_correct(_probs(probs_or_logits, from_logits), labels)
    return _ece(conf, correct, n_bins)


def _aurc_from_sorted(errors: Tensor) -> float:
    """Mean over k = 1..N of (errors among the first k)/k, for errors in ranking order."""
    k = torch.arange(1, errors.numel() + 1, dtype=torch.float64, device=errors.device)
    return (errors.cumsum(0) / k).mean().item()


def _aurc_eaurc(conf: Tensor, correct: Tensor) -> tuple[float, float]:
    order = torch.sort(conf, descending=True, stable=True).indices
    errors = 1.0 - correct
    aurc_value = _aurc_from_sorted(errors[order])
    # The optimal ranking puts every correct sample before every error.
    optimal = _aurc_from_sorted(torch.sort(errors, stable=True).values)
    return aurc_value, aurc_value - optimal


def aurc(probs_or_logits: Tensor, labels: Tensor, from_logits: bool | None = None) -> float:
    """Area under the risk–coverage curve, a fraction in [0, 1] (lower is better).

    Geifman, Uziel & El-Yaniv 2019, "Bias-Reduced Uncertainty Estimation for Deep Neural
    Classifiers" (ICLR), §3: sort the N samples by confidence (max softmax probability), highest
    first; at coverage k/N (k = 1..N) the selective risk is the number of errors among the top k
    divided by k; AURC is the mean of those N risks. Ties in confidence keep the input order
    (a stable sort), so the value is deterministic for a fixed sample order.
    """
    _check(probs_or_logits, labels, "aurc")
    conf, correct = _confidence_correct(_probs(probs_or_logits, from_logits), labels)
    return _aurc_eaurc(conf, correct)[0]


def eaurc(probs_or_logits: Tensor, labels: Tensor, from_logits: bool | None = None) -> float:
    """Excess AURC: AURC minus the AURC of the optimal ranking at the same error rate.

    Geifman et al. 2019, §3. The optimum ranks every correct sample before every error; we use
    its exact discrete value (the same mean over k = 1..N), of which Geifman's closed form
    r + (1 − r)·ln(1 − r) (r = error rate) is the continuous limit. E-AURC is therefore >= 0
    and exactly 0 for a perfect confidence ranking.
    """
    _check(probs_or_logits, labels, "eaurc")
    conf, correct = _confidence_correct(_probs(probs_or_logits, from_logits), labels)
    return _aurc_eaurc(conf, correct)[1]


def evaluate_all(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``top1``, ``top5`` (percent), ``nll`` (nats), ``ece``, ``aurc``, ``eaurc`` (fractions).

    ``logits`` are (N, C) raw scores over the whole evaluation set, each sample once.
    """
    _check(logits, labels, "evaluate_all")
    labels = labels.long().to(logits.device)
    out = topk_accuracy(logits, labels, (1, 5))
    log_probs = F.log_softmax(logits.double(), dim=1)
    out["nll"] = -log_probs.gather(1, labels.view(-1, 1)).mean().item()
    max_log_prob, pred = log_probs.max(dim=1)  # no second (N, C) float64 tensor
    conf, correct = max_log_prob.exp(), (pred == labels).double()
    out["ece"] = _ece(conf, correct, n_bins)
    out["aurc"], out["eaurc"] = _aurc_eaurc(conf, correct)
    return out


__all__ = ["aurc", "eaurc", "ece", "evaluate_all", "gather_eval", "nll", "topk_accuracy"]
