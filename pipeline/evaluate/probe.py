"""Representation quality of a frozen student: linear probe and weighted k-NN on its embedding.

Unsupervised distillation (CoSS, specs/methods.md §4.4) trains no classifier, so its students
are judged by what a classifier can read off their pooled penultimate embedding:

**Linear probe** (CIFAR recipe of the CoSS code [C ``URepDistiller/cifar/lincls.py``]): a
``Linear(d, C)`` on the frozen network, initialised N(0, 0.01) with zero bias, trained with
cross-entropy by SGD (LR 0.1, momentum 0.9, weight decay 5e-4, batch 128) for 100 epochs, LR
×0.1 at epochs 50, 70 and 90. Other epoch counts scale the milestones (``round(m·E/100)``).
lincls.py reports the best test accuracy over the epochs; we report the last epoch's metrics
and, beside them, the best top-1 and its epoch.

One deliberate difference, for speed: the network is frozen (lincls.py also runs it in eval
mode), so its features are extracted ONCE and the linear layer trains on them. lincls.py draws
a fresh random crop (pad 4, crop 32, no flip) every epoch; here the default is the
deterministic eval transform for every epoch (``train_views: 0``), or ``V`` fixed augmented
views of the run's augmentation plan, epoch e using view e mod V (V× the extraction cost).

**Weighted k-NN** (Wu et al., CVPR 2018, §3.4; the DINO / SEED ``eval_knn`` implementation):
embeddings L2-normalised; for each test sample its k most cosine-similar training samples
vote for their labels with weight exp(s/τ), τ = 0.07; the class with the largest total wins.
We report k = 20 (DINO's default; SEED's k-NN) and k = 200 (Wu et al.'s), both with τ = 0.07,
training samples under the eval transform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.evaluate.metrics import evaluate_all, topk_accuracy
from pipeline.types import Batch

KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07
RECIPE_EPOCHS = 100
RECIPE_MILESTONES = (50, 70, 90)


@dataclass
class ProbeRecipe:
    """The linear-probe optimisation (lincls.py defaults)."""

    epochs: int = RECIPE_EPOCHS
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)  # []: 50/70/90 scaled to ``epochs``
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(
                f"probe: expected epochs >= 1, batch_size >= 1 and lr > 0, found epochs="
                f"{self.epochs} batch_size={self.batch_size} lr={self.lr}"
            )
        if not self.milestones:
            scaled = {round(m * self.epochs / RECIPE_EPOCHS) for m in RECIPE_MILESTONES}
            self.milestones = sorted(m for m in scaled if 0 < m < self.epochs)

    def lr_at(self, epoch: int) -> float:
        """LR of 0-based ``epoch``: ×gamma once for every milestone already reached."""
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def extract_features(
    embed: Callable[[Tensor], Tensor],
    loader: Iterable[Batch],
    prepare: Callable[[Batch], Batch],
) -> tuple[Tensor, Tensor, Tensor]:
    """(features float32 (N, d), labels (N,), sample index (N,)) on the CPU, in index order.

    ``embed`` maps prepared images to embeddings; padding (index -1) is dropped.
    """
    feats, labels, index = [], [], []
    for raw in loader:
        if len(raw) == 0:
            continue
        batch = prepare(raw)
        keep = batch.index >= 0
        feats.append(embed(batch.images)[keep].float().cpu())
        labels.append(batch.labels[keep].cpu())
        index.append(batch.index[keep].cpu())
    if not feats:
        raise ValueError("probe: expected at least one readable sample, found none")
    x, y, i = torch.cat(feats), torch.cat(labels), torch.cat(index)
    order = torch.argsort(i)
    return x[order], y[order], i[order]


def _top1(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean() * 100.0)


def train_linear_probe(
    train_views: Sequence[Tensor],
    train_labels: Tensor,
    num_classes: int,
    recipe: ProbeRecipe,
    eval_sets: dict[str, tuple[Tensor, Tensor]] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Linear, list[dict[str, float]]]:
    """Train ``Linear(d, C)`` on frozen features; epoch e reads ``train_views[e mod V]``.

    Returns the layer (on the CPU) and one row per epoch: train loss and, for each eval set,
    its top-1 after that epoch.
    """
    if not train_views or any(v.shape[0] != train_labels.shape[0] for v in train_views):
        raise ValueError("probe: expected one (N, d) feature tensor per view, N = #labels")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(recipe.seed)
    d = train_views[0].shape[1]
    head = nn.Linear(d, num_classes).to(dev)
    with torch.no_grad():  # lincls.py: fc.weight ~ N(0, 0.01), fc.bias = 0
        head.weight.copy_(torch.randn(num_classes, d, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    views = [v.to(dev, torch.float32) for v in train_views]
    y = train_labels.to(dev)
    evals = {k: (x.to(dev, torch.float32), t.to(dev)) for k, (x, t) in (eval_sets or {}).items()}
    n = y.shape[0]
    history: list[dict[str, float]] = []
    for epoch in range(recipe.epochs):
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(epoch)
        x = views[epoch % len(views)]
        perm = torch.randperm(n, generator=gen).to(dev)
        total = torch.zeros((), device=dev)
        for s in range(0, n, recipe.batch_size):  # the last, smaller batch is kept
            idx = perm[s : s + recipe.batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()
        row = {"epoch": float(epoch + 1), "train_loss": float(total) / n}
        with torch.no_grad():
            for name, (ex, ey) in evals.items():
                row[f"{name}/top1"] = _top1(head(ex), ey)
        history.append(row)
    return head.cpu(), history


def probe_metrics(
    head: nn.Linear, history: list[dict[str, float]], x: Tensor, y: Tensor, name: str
) -> dict[str, float]:
    """The last epoch's metrics of the probe on (x, y) (top-1/5, NLL, ECE, AURC ...), plus the
    best top-1 over the epochs and its epoch (lincls.py reports that best)."""
    with torch.no_grad():
        logits = head(x.float())
    out = evaluate_all(logits, y)
    tops = [(r.get(f"{name}/top1", math.nan), int(r["epoch"])) for r in history]
    best = max(tops, key=lambda t: (t[0], -t[1])) if tops else (math.nan, 0)
    out["best_top1"], out["best_epoch"] = float(best[0]), float(best[1])
    return out


@torch.no_grad()
def knn_scores(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = KNN_KS[0],
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 256,
) -> Tensor:
    """Weighted k-NN class scores (N_test, C), Wu et al. 2018 (module docstring).

    Cosine similarity of L2-normalised features, the top ``min(k, N_train)`` neighbours of each
    test sample, each voting exp(s/τ) for its label. Computed ``chunk`` test rows at a time.
    """
    if train_feats.shape[0] != train_labels.shape[0] or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"knn: expected train (N, d), labels (N,), test (M, d), found "
            f"{tuple(train_feats.shape)}, {tuple(train_labels.shape)}, {tuple(test_feats.shape)}"
        )
    if k < 1 or not temperature > 0:
        raise ValueError(f"knn: expected k >= 1 and temperature > 0, found {k}, {temperature}")
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(test_feats.float().to(bank.device), dim=1)
    labels = train_labels.to(bank.device)
    k = min(k, bank.shape[0])
    out = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=bank.device)
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s : s + chunk] @ bank.T
        top, idx = sim.topk(k, dim=1, largest=True, sorted=True)
        weights = (top / temperature).exp()
        out[s : s + chunk].scatter_add_(1, labels[idx], weights)
    return out


def knn_metrics(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """top-1 and top-5 (%) of k-NN class scores."""
    return topk_accuracy(scores, labels.to(scores.device), (1, 5))


def _loaders(spec: Any, index: Any, views: int) -> list[Iterable[Batch]]:
    """Loaders over every sample of ``index``, in order: the eval transform (``views`` = 0) or
    each of ``views`` training views of the run's augmentation plan."""
    from torch.utils.data import DataLoader

    from pipeline.data import AugPlan, build_eval_loader
    from pipeline.data.loader import Collate, IndexDataset
    from pipeline.data.transforms import EvalTransform

    d = spec.data
    if views == 0:
        return [build_eval_loader(index, d, 0, 1)]
    plan = AugPlan.from_spec(d, spec.seed)
    dataset = IndexDataset(index, plan, EvalTransform.from_spec(d))
    out: list[Iterable[Batch]] = []
    for v in range(views):
        keys = [[(i, v) for i in range(s, min(s + d.eval_batch_size, len(index)))]
                for s in range(0, len(index), d.eval_batch_size)]
        loader = DataLoader(dataset, batch_sampler=keys, num_workers=d.workers,
                            collate_fn=Collate(dataset.size, train=False))
        out.append(Batch(*b[:4]) for b in loader)
    return out


def probe_student(
    spec: Any,
    student: nn.Module,
    train_index: Any,
    eval_indices: dict[str, Any],
    num_classes: int,
    device: torch.device,
    recipe: ProbeRecipe | None = None,
    knn_ks: Sequence[int] = KNN_KS,
    train_views: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Linear probe and k-NN of ``student``'s embedding on a run's data (``spec``: RunSpec).

    Features: the training split under the eval transform (for k-NN, and for the probe unless
    ``train_views`` > 0) and every eval split. Returns a JSON-able dict: ``probe`` and
    ``knn_k<k>`` metrics per eval split, the recipe and the settings used.
    """
    from pipeline.data import to_device

    recipe = recipe or ProbeRecipe(seed=spec.seed)
    d = spec.data
    student = student.to(device).eval()

    def prepare(b: Batch) -> Batch:
        return to_device(b, device, d.mean, d.std)

    def embed(x: Tensor) -> Tensor:
        return student(x).embedding

    log(f"probe: extracting features of {len(train_index)} training samples")
    train_x, train_y, _ = extract_features(embed, _loaders(spec, train_index, 0)[0], prepare)
    views = [train_x]
    if train_views > 0:
        log(f"probe: extracting {train_views} augmented view(s) of the training split")
        views = [extract_features(embed, ld, prepare)[0]
                 for ld in _loaders(spec, train_index, train_views)]
    evals = {}
    for split, index in eval_indices.items():
        x, y, _ = extract_features(embed, _loaders(spec, index, 0)[0], prepare)
        evals[split] = (x, y)
    log(f"probe: training Linear({train_x.shape[1]}, {num_classes}) for {recipe.epochs} epochs")
    head, history = train_linear_probe(views, train_y, num_classes, recipe, evals, device)
    result: dict[str, Any] = {
        "feature_dim": int(train_x.shape[1]),
        "num_train": int(train_x.shape[0]),
        "recipe": recipe.to_dict(),
        "train_views": train_views,
        "knn_temperature": KNN_TEMPERATURE,
        "probe": {s: probe_metrics(head, history, x, y, s) for s, (x, y) in evals.items()},
        "probe_history": history,
    }
    for k in knn_ks:
        result[f"knn_k{k}"] = {
            s: knn_metrics(knn_scores(train_x.to(device), train_y, x, num_classes, k), y)
            for s, (x, y) in evals.items()
        }
    return result
