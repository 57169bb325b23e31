"""Pure loss terms of CID: Deng & Zhang, NeurIPS 2021, "Comprehensive Knowledge Distillation with
Causal Intervention" (specs/methods.md §1; paper eqs. 1–8).

- ``nm_mse``: eq. 1, ℳ(V_a, V_b) = ‖V_a − V_b‖² / ‖V_b‖², averaged over the batch (the sample
  term α·ℳ(h_sᵀW, h_t) of eqs. 3 and 8; authors' ``NORM_MSE``). ``plain_mse`` is the paper's
  MSE(V_a, V_b) = ‖V_a − V_b‖² of the same section, for the "CID_mse" ablation (Fig. 6).
- ``class_shape_loss``: eqs. 2–3, the class shape C_i = Ĥ_i Ĥ_iᵀ (Gram of L2-normalised rows)
  compared between student and teacher. The paper sums squared Frobenius norms over classes
  (eq. 3; eq. 8 writes an unsquared norm); we follow the authors' code (spec §1.2.2): mean of
  the squared differences over the k_c² entries, averaged over the classes with k_c ≥ 2 in the
  batch, 0 when there are none.
- ``interventional_logits``: eqs. 4, 6 and 7, P(Y|do(X)) with the class centres c̄_i (eq. 5) as
  the context items and a_i = σ(z_s/T)_i as the coefficients; rule ``"nwgm"`` (eq. 7, the code)
  or ``"full"`` (eqs. 4/6); P(c_i) is 1/C, or the measured class frequencies of the training set
  (``class_frequencies``: "the percentage of the samples in class c_i", after eq. 6).
- ``true_class_weights``, ``accumulate_centres``, ``finalize_centres``: eq. 5 as the code
  computes it (spec §1.3): weights P(c_i|x_j) = σ(z_t/T)[y_j], features h_j the detached
  student embeddings of the current forward pass, a weighted mean per class over one epoch.

All terms compute in float32 with autocast switched off, whatever the input dtype (fp16 teacher
cache, bf16 autocast), so the Gram and mixture sums do not lose precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

ContextRule = Literal["nwgm", "full"]

# Elements of one (B, centres, classes) block of the "full" rule; larger mixtures are chunked.
FULL_CHUNK_ELEMENTS = 1 << 24


@contextmanager
def _float32(t: Tensor) -> Iterator[None]:
    """Switch autocast off on ``t``'s device so float32 inputs stay float32."""
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


def _check_pair(pred: Tensor, target: Tensor, where: str) -> None:
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(
            f"{where}: expected prediction and target of the same shape (B, d), found "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )


def nm_mse(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """NM_MSE, eq. 1: (1/B)·Σ_b ‖pred_b − target_b‖² / (‖target_b‖² + eps).

    The squared error is summed over the feature dims and divided by that sample's squared target
    norm, so samples with small teacher features weigh as much as those with large ones. The
    authors' code adds no eps; teacher features are post-ReLU pooled vectors whose norm is
    nonzero in practice, and eps = 1e-8 only guards against an all-zero row (spec §1.2.1).

    Args:
        pred: W·h_s + b, shape (B, d_t); gradients flow into it.
        target: h_t, shape (B, d_t).
    Returns:
        A float32 scalar.
    """
    _check_pair(pred, target, "nm_mse")
    with _float32(pred):
        p, t = pred.float(), target.float()
        return ((p - t).pow(2).sum(dim=1) / (t.pow(2).sum(dim=1) + eps)).mean()


def plain_mse(pred: Tensor, target: Tensor) -> Tensor:
    """MSE as the paper defines it next to eq. 1: (1/B)·Σ_b ‖pred_b − target_b‖².

    Summed over the feature dims and averaged over the batch (the same reduction as ``nm_mse``
    without its per-sample normaliser); ``nn.MSELoss()`` would be d_t times smaller.
    """
    _check_pair(pred, target, "plain_mse")
    with _float32(pred):
        return (pred.float() - target.float()).pow(2).sum(dim=1).mean()


def class_shape_loss(
    h_s: Tensor, h_t: Tensor, labels: Tensor, reduction: Literal["mean", "sum"] = "mean"
) -> Tensor:
    """Class-representation loss, eqs. 2–3 in the form of the authors' code (spec §1.2.2).

    For each class c with k_c ≥ 2 samples in the batch: ℓ_c = (1/k_c²)·Σ_ij (G_t − G_s)_ij² with
    G = Ĥ Ĥᵀ the Gram of the L2-normalised rows (``F.normalize``, eps 1e-12) of that class's
    raw features; the loss is the mean of ℓ_c over those classes, and 0 if there is none.

    Vectorised over the batch: with D_ij = (G_t − G_s)_ij² on the full B×B Grams and S_ij = 1 if
    y_i = y_j, r_i = Σ_j S_ij D_ij and k_i = Σ_j S_ij (the size of sample i's class), then
    Σ_c ℓ_c = Σ_i r_i / k_i² and the number of classes is Σ_i 1/k_i (each restricted to k_i ≥ 2).
    No class count is needed and nothing waits on the device.

    Args:
        h_s: raw student embeddings (not W-projected), shape (B, d_s).
        h_t: teacher embeddings, shape (B, d_t).
        labels: ground-truth labels, shape (B,).
        reduction: ``"mean"`` (the code, above) or ``"sum"``, the paper's eq. 3:
            Σ_c ‖C_c^S − C_c^T‖²_F summed over the classes, without the 1/k_c² and the average
            (a larger scale: β needs retuning).
    Returns:
        A float32 scalar.
    """
    if h_s.dim() != 2 or h_t.dim() != 2 or not (h_s.shape[0] == h_t.shape[0] == labels.numel()):
        raise ValueError(
            f"class_shape_loss: expected h_s (B, d_s), h_t (B, d_t) and labels (B,), found "
            f"{tuple(h_s.shape)}, {tuple(h_t.shape)} and {tuple(labels.shape)}"
        )
    with _float32(h_s):
        n_s = F.normalize(h_s.float(), dim=1)
        n_t = F.normalize(h_t.float(), dim=1)
        diff = (n_t @ n_t.T - n_s @ n_s.T).pow(2)
        y = labels.reshape(-1)
        same = (y[:, None] == y[None, :]).to(diff.dtype)
        k = same.sum(dim=1)
        involved = (k >= 2).to(diff.dtype)
        if reduction == "sum":
            return (diff * same).sum()  # classes with k_c = 1 contribute (1 − 1)² = 0
        if reduction != "mean":
            raise ValueError(f"class_shape_loss: expected 'mean' or 'sum', found {reduction!r}")
        per_class_sum = ((diff * same).sum(dim=1) / k.pow(2) * involved).sum()
        n_classes = (involved / k).sum()
        return per_class_sum / n_classes.clamp(min=1.0)


def context_coefficients(student_logits: Tensor, T: float) -> Tensor:
    """a^s = σ(z_s/T), detached (spec §1.2.4): the interventional CE reaches neither the
    student's original head nor its backbone through the coefficients. Float32, (B, C)."""
    with _float32(student_logits):
        return F.softmax(student_logits.detach().float() / T, dim=1)


def interventional_logits(
    classifier: nn.Linear,
    h: Tensor,
    coeffs: Tensor,
    centres: Tensor,
    rule: ContextRule = "nwgm",
    prior_factor: bool = False,
    prior: Tensor | None = None,
) -> Tensor:
    """The interventional classifier's prediction P(Y|do(X)), as logits for cross-entropy.

    With m = centres.shape[0] context items (one per class) and P(c_i) = 1/m (balanced data):

    - ``"nwgm"`` (eq. 7, authors' code): z = g_new([h ; s·Σ_i a_i c̄_i]) with s = 1/m when
      ``prior_factor`` (the paper's P(c_i)) and s = 1 otherwise (the code; for balanced data the
      factor is a constant scale that g_new absorbs). Returns z.
    - ``"full"`` (eqs. 4/6): P(y|do(x)) = Σ_i P(c_i)·σ(z_i)_y with z_i = g_new([h ; t·a_i c̄_i])
      the prediction given context item i alone, t = 1 when ``prior_factor`` (exactly eq. 6) and
      t = m otherwise. Returns log P(y|do(x)); these are logits whose softmax is the mixture
      itself (they already sum to 1 in probability), so cross-entropy and argmax apply as is.

    The two rules are related exactly: g_new is linear and Σ_i P(c_i) = 1, so the "nwgm" logits
    equal Σ_i P(c_i)·z_i, the mean of the "full" rule's per-item logits; softmax of that mean is
    the normalised weighted geometric mean of the σ(z_i) (Xu et al. 2015), which eq. 7 uses in
    place of their arithmetic mean. Both give the same prediction when all z_i are equal (all
    a_i c̄_i equal, e.g. equal centres and uniform coefficients). ``t`` is chosen so this holds
    for both settings of ``prior_factor``.

    ``prior`` (m,), when given, is P(c_i) itself: "the percentage of the samples in class c_i"
    (the text after eq. 6), measured on the run's training set by ``class_frequencies``. It
    replaces 1/m in both rules as the paper writes them: "nwgm" z = g_new([h ; Σ_i P(c_i) a_i
    c̄_i]) and "full" log Σ_i P(c_i)·σ(g_new([h ; a_i c̄_i])) (t = 1), so the relation above holds
    for it too; ``prior_factor`` is then ignored. A class with P(c_i) = 0 (dropped from training)
    contributes nothing.

    "full" costs B·m·C values: it is evaluated through the linear split g_new([h ; u]) =
    W_h h + b + W_c u, chunked over the centres, with each chunk recomputed in the backward pass.

    Args:
        classifier: g_new, ``nn.Linear(d_h + d_ctx, C)``; its first d_h inputs take h.
        h: student embeddings, (B, d_h); gradients flow into it.
        coeffs: a^s, (B, m), from ``context_coefficients`` (no gradient).
        centres: c̄, (m, d_ctx), a buffer (no gradient).
        prior: P(c_i), (m,), non-negative and summing to 1; None for the rule of ``prior_factor``.
    Returns:
        Float32 logits (B, C).
    """
    B, d_h = h.shape
    m, d_ctx = centres.shape
    if coeffs.shape != (B, m) or classifier.in_features != d_h + d_ctx:
        raise ValueError(
            f"interventional_logits: expected h (B, d_h), coefficients (B, m), centres (m, d_ctx) "
            f"and a classifier on d_h + d_ctx inputs, found h {tuple(h.shape)}, coefficients "
            f"{tuple(coeffs.shape)}, centres {tuple(centres.shape)} and a classifier on "
            f"{classifier.in_features} inputs"
        )
    if prior is not None and prior.shape != (m,):
        raise ValueError(f"interventional_logits: expected a prior of shape ({m},), found "
                         f"{tuple(prior.shape)}")
    with _float32(h):
        weight = classifier.weight.float()
        bias = None if classifier.bias is None else classifier.bias.float()
        a, c, x = coeffs.float(), centres.float(), h.float()
        if rule == "nwgm":
            if prior is not None:
                context = (a * prior.float().to(a.device)) @ c
            else:
                context = (a @ c) * (1.0 / m if prior_factor else 1.0)
            return F.linear(torch.cat([x, context], dim=1), weight, bias)
        if rule == "full":
            base = F.linear(x, weight[:, :d_h], bias)  # (B, C): W_h h + b
            per_item = c @ weight[:, d_h:].T  # (m, C): W_c c̄_i
            if prior is not None:
                log_w = prior.float().to(a.device).log()  # log 0 = -inf: the item drops out
                return _mixture_log_prob(base, a, per_item, log_w)
            scaled = a * (1.0 if prior_factor else float(m))
            return _mixture_log_prob(base, scaled, per_item)
    raise ValueError(f"interventional_logits: expected rule 'nwgm' or 'full', found {rule!r}")


def _mixture_chunk(base: Tensor, scaled: Tensor, per_item: Tensor, log_w: Tensor) -> Tensor:
    """log Σ_{i in chunk} w_i·σ(base + scaled_i·per_item_i), shape (B, C)."""
    z = base[:, None, :] + scaled[:, :, None] * per_item[None, :, :]
    return torch.logsumexp(F.log_softmax(z, dim=2) + log_w[None, :, None], dim=1)


def _mixture_log_prob(
    base: Tensor, scaled: Tensor, per_item: Tensor, log_w: Tensor | None = None
) -> Tensor:
    """log Σ_i w_i·σ(base + scaled_i·per_item_i), chunked over the m items; ``log_w`` (m,) the
    log mixture weights, None for w_i = 1/m."""
    B, C = base.shape
    m = per_item.shape[0]
    if log_w is None:
        log_w = torch.full((m,), -math.log(m), dtype=base.dtype, device=base.device)
    chunk = max(1, FULL_CHUNK_ELEMENTS // max(1, B * C))
    if chunk >= m:
        return _mixture_chunk(base, scaled, per_item, log_w)
    total = None
    recompute = torch.is_grad_enabled() and (base.requires_grad or per_item.requires_grad)
    for start in range(0, m, chunk):
        items = slice(start, start + chunk)
        args = (base, scaled[:, items], per_item[items], log_w[items])
        if recompute:
            part = checkpoint(_mixture_chunk, *args, use_reentrant=False)
        else:
            part = _mixture_chunk(*args)
        total = part if total is None else torch.logaddexp(total, part)
    return total


def class_frequencies(labels: Tensor, num_classes: int) -> Tensor:
    """P(c_i) = n_i / N, the share of the training samples in class i (text after eq. 6), as
    float32 (C,). Labels outside 0..C-1 are an error."""
    y = torch.as_tensor(labels).long().reshape(-1)
    if y.numel() == 0:
        raise ValueError("class_frequencies: expected at least one training label, found none")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"class_frequencies: expected labels in 0..{num_classes - 1}, found "
                         f"{int(y.min())}..{int(y.max())}")
    counts = torch.bincount(y, minlength=num_classes).double()
    return (counts / counts.sum()).float()


def true_class_weights(teacher_logits: Tensor, labels: Tensor, T: float) -> Tensor:
    """w_j = σ(z_t,j/T)[y_j], the teacher's softened probability of the true class (eq. 5's
    P(c_i|x_j) as the code sets it, spec §1.3). Float32, (B,), no gradient."""
    with _float32(teacher_logits):
        p = F.softmax(teacher_logits.detach().float() / T, dim=1)
        return p.gather(1, labels.long().reshape(-1, 1)).squeeze(1)


@torch.no_grad()
def accumulate_centres(
    acc_sum: Tensor, acc_weight: Tensor, feats: Tensor, labels: Tensor, weights: Tensor
) -> None:
    """In place: acc_sum[y_j] += w_j·h_j and acc_weight[y_j] += w_j for every sample j.

    ``acc_sum`` (C, d) and ``acc_weight`` (C,) are float32; dividing them at the end of the epoch
    (``finalize_centres``) gives exactly the code's online weighted running mean, updated sample
    by sample (spec §1.3). ``index_add_`` needs no loop and no host synchronisation.
    """
    y = labels.long().reshape(-1)
    w = weights.detach().to(acc_weight.dtype).reshape(-1)
    acc_sum.index_add_(0, y, feats.detach().to(acc_sum.dtype) * w[:, None])
    acc_weight.index_add_(0, y, w)


@torch.no_grad()
def finalize_centres(acc_sum: Tensor, acc_weight: Tensor, previous: Tensor) -> Tensor:
    """c̄_i = acc_sum_i / acc_weight_i (eq. 5); a class with zero accumulated weight (not seen
    this epoch, anywhere) keeps its ``previous`` centre."""
    seen = acc_weight > 0
    mean = acc_sum / torch.where(seen, acc_weight, torch.ones_like(acc_weight))[:, None]
    return torch.where(seen[:, None], mean, previous.to(mean.dtype))


__all__ = [
    "ContextRule",
    "accumulate_centres",
    "class_frequencies",
    "class_shape_loss",
    "context_coefficients",
    "finalize_centres",
    "interventional_logits",
    "nm_mse",
    "plain_mse",
    "true_class_weights",
]
