"""CRD's state: two memory banks of L2-normalised embeddings, the frozen normalisation constants
Z and the negative sampler (baselines.md §11; RepDistiller ``crd/memory.py``, ``crd/criterion.py``).

``memory_s`` (RepDistiller's ``memory_v1``) holds the student-side embedding of every training
sample, ``memory_t`` (``memory_v2``) the teacher side; both start uniform in [−s, s] with
s = 1/sqrt(dim/3). One step, for the samples ``index`` of this process:

1. **Negatives** ("exact" mode): the positive of sample i is i itself; its K negatives are
   dataset indices drawn uniformly from the samples of all *other* classes, without replacement
   (RepDistiller's CIFAR loader) or with replacement (its ImageNet loader). They are drawn for
   the *global* batch (every process's indices, all-gathered in rank order) from a generator
   seeded by (seed, step count), the same on every process, and each process takes its rows: a
   run on P processes of batch b draws exactly what one process of batch P·b draws.
2. **Scores** against the old banks, detached from them: out_s[b, k] = exp(⟨memory_t[c_bk],
   e_s,b⟩ / T) (student anchor, teacher bank) and out_t[b, k] = exp(⟨memory_s[c_bk], e_t,b⟩ / T).
3. **Z**, on the first step only: Z_s = mean(out_s)·N and Z_t = mean(out_t)·N over the global
   batch (sums all-reduced in float64), then frozen. Scores are returned divided by Z.
4. **Update**, without gradient: memory_s[i] ← normalise(m·memory_s[i] + (1−m)·e_s,i), the same
   for memory_t with e_t, with every process's indices and embeddings all-gathered and applied
   in the same order on every process. A sample that occurs twice in one global batch is
   updated once, from its last occurrence (RepDistiller's ``index_copy_`` keeps one of them).

Across processes the banks, Z and the step count are therefore identical by construction, and
they are excluded from DistributedDataParallel's buffer broadcast (``RANK_LOCAL_BUFFERS``, read
by ``compose.mark_rank_local_buffers``): a broadcast of rank 0's copy would be a no-op costing
2·N·dim floats every step (1.3 GB on ImageNet). ``check_replicas`` (a collective) verifies the
claim. Everything is computed in float32 with autocast off: exp(⟨·⟩/0.07) reaches e^14.3 ≈ 1.6e6,
beyond float16.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.dist import all_gather_cat, all_reduce_sum, is_distributed, rank

WITH_REPLACEMENT = "with_replacement"
WITHOUT_REPLACEMENT = "without_replacement"
_SEED_MIX = 0x9E3779B97F4A7C15  # spreads (seed, step) over the generator's seed space


def effective_k(labels: Tensor, k: int, cap_fraction: float) -> int:
    """K capped at ``cap_fraction`` of the smallest pool of other-class samples: N − n_max.

    With CIFAR-100's K = 16384 of 49,500 (≈ 1/3) the default cap of 1/3 changes no reference
    setting (ImageNet's pool is 1.28 M), and on small data it keeps the noise share m·P_n = K/N
    of the reference recipe instead of drawing every other sample (or more) each step."""
    counts = torch.bincount(labels.long())
    pool = int(labels.numel() - counts.max())
    if pool < 1:
        raise ValueError("crd: every training sample has the same class; negatives are drawn "
                         "from the other classes, found none")
    return max(1, min(k, math.floor(cap_fraction * pool)))


class NegativeSampler(nn.Module):
    """K dataset indices of other classes per row, drawn uniformly (module docstring, step 1).

    With replacement: u ~ U{0 .. N − n_c − 1} indexes the samples sorted by class (stable) with
    class c's block cut out. Without replacement: the K smallest of N uniforms, those of class c
    set above 1, a uniformly random K-subset of the other classes (B·N numbers per step).
    """

    # Equal on every process (built from the same labels): kept out of DDP's buffer broadcast.
    RANK_LOCAL_BUFFERS = ("labels", "by_class", "counts", "starts")

    def __init__(self, labels: Tensor, k: int, mode: str) -> None:
        super().__init__()
        labels = labels.long()
        counts = torch.bincount(labels)
        self.k, self.mode = k, mode
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)

    def draw(self, rows_labels: Tensor, generator: torch.Generator) -> Tensor:
        """(B, K) negatives for rows of classes ``rows_labels`` (B,), int64 on the buffers'
        device."""
        n, device = self.labels.numel(), self.labels.device
        if self.mode == WITHOUT_REPLACEMENT:
            r = torch.rand(rows_labels.numel(), n, generator=generator, device=device)
            r.masked_fill_(self.labels.view(1, -1) == rows_labels.view(-1, 1), 2.0)
            return torch.topk(r, self.k, dim=1, largest=False, sorted=False).indices
        r = torch.rand(rows_labels.numel(), self.k, generator=generator, device=device,
                       dtype=torch.float64)
        return self.pick(rows_labels, r)

    def pick(self, rows_labels: Tensor, r: Tensor) -> Tensor:
        """With replacement: map uniforms r ∈ [0, 1) (B, K) to other-class sample indices."""
        n_c = self.counts[rows_labels].view(-1, 1)
        pool = self.labels.numel() - n_c
        u = torch.minimum((r * pool).long(), pool - 1)
        u = u + (u >= self.starts[rows_labels].view(-1, 1)) * n_c  # skip class c's block
        return self.by_class[u]


class ContrastMemory(nn.Module):
    """The banks, Z and the sampler of one CRD run (module docstring)."""

    # Identical on every process by construction: kept out of DDP's buffer broadcast.
    RANK_LOCAL_BUFFERS = ("memory_s", "memory_t", "z", "steps")

    def __init__(self, labels: Tensor, dim: int, k: int, temperature: float, momentum: float,
                 mode: str, seed: int) -> None:
        super().__init__()
        n = labels.numel()
        self.num_samples, self.temperature, self.momentum = n, temperature, momentum
        self.seed = seed
        self.sampler = NegativeSampler(labels, k, mode)
        stdv = 1.0 / math.sqrt(dim / 3)
        g = torch.Generator().manual_seed(seed)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, torch.rand(n, dim, generator=g).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))  # (Z_s, Z_t); < 0: not set yet
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Host copies of ``steps`` and "Z is set", so a step needs no device→host sync; a loaded
        # state dict refreshes them.
        self.host_steps, self.z_ready = 0, False
        self.register_load_state_dict_post_hook(_refresh_host_copies)
        self.gathered: tuple[Tensor, int, list[int]] | None = None  # this step's global index
        self.last_contrast_idx: Tensor | None = None  # this process's (B, K+1), for tests

    @property
    def k(self) -> int:
        return self.sampler.k

    def generator(self) -> torch.Generator:
        """The negatives' generator of the current step: a function of (seed, step count) only,
        so resuming from a checkpoint (which holds ``steps``) draws the same numbers."""
        device = self.memory_s.device
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * _SEED_MIX + self.host_steps) % (1 << 63))
        return g

    def contrast_indices(self, index: Tensor) -> Tensor:
        """(B, K+1) indices for this process's samples ``index`` (B,): itself, then K negatives
        drawn for the gathered global batch (rank order) of which these are this rank's rows."""
        index = index.long().to(self.memory_s.device)
        everyone, offset, lengths = gather_rows(index)
        self.gathered = (everyone, offset, lengths)
        negatives = self.sampler.draw(self.sampler.labels[everyone], self.generator())
        mine = negatives[offset:offset + index.numel()]
        self.last_contrast_idx = torch.cat([index.view(-1, 1), mine], dim=1)
        return self.last_contrast_idx

    def scores(self, e_s: Tensor, e_t: Tensor, contrast_idx: Tensor) -> tuple[Tensor, Tensor]:
        """(out_s, out_t), each (B, K+1) and divided by Z (Z set from this step if not yet)."""
        b, dim = e_s.shape
        w_t = self.memory_t[contrast_idx.view(-1)].view(b, -1, dim)
        w_s = self.memory_s[contrast_idx.view(-1)].view(b, -1, dim)
        out_s = torch.exp(torch.bmm(w_t, e_s.view(b, dim, 1)).squeeze(2) / self.temperature)
        out_t = torch.exp(torch.bmm(w_s, e_t.view(b, dim, 1)).squeeze(2) / self.temperature)
        if not self.z_ready:
            self.set_z(out_s.detach(), out_t.detach())
        return out_s / self.z[0], out_t / self.z[1]

    @torch.no_grad()
    def set_z(self, out_s: Tensor, out_t: Tensor) -> None:
        """Z = mean score · N over the global batch: sums and counts all-reduced in float64."""
        sums = torch.stack([out_s.double().sum(), out_t.double().sum(),
                            torch.tensor(float(out_s.numel()), dtype=torch.float64,
                                         device=out_s.device)])
        all_reduce_sum(sums)
        self.z.copy_((sums[:2] / sums[2] * self.num_samples).to(self.z.dtype))
        self.z_ready = True

    @torch.no_grad()
    def update(self, e_s: Tensor, e_t: Tensor) -> None:
        """Momentum update of both banks with every process's rows (module docstring, step 4):
        the embeddings of the samples of this step's ``contrast_indices`` call."""
        if self.gathered is None:
            raise RuntimeError("crd: update() before contrast_indices() in this step")
        idx, _, lengths = self.gathered
        self.gathered = None
        if e_s.shape[0] != lengths[rank()] or e_t.shape[0] != e_s.shape[0]:
            raise ValueError(f"crd: update() expected the {lengths[rank()]} rows of this step's "
                             f"samples, found {e_s.shape[0]} and {e_t.shape[0]}")
        dim = e_s.shape[1]
        rows, _, _ = gather_rows(torch.cat([e_s, e_t], dim=1).detach().float(), lengths)
        keep = last_occurrences(idx)
        idx, rows = idx[keep], rows[keep]
        for bank, new in ((self.memory_s, rows[:, :dim]), (self.memory_t, rows[:, dim:])):
            mixed = bank.index_select(0, idx).mul_(self.momentum).add_(new * (1 - self.momentum))
            bank.index_copy_(0, idx, mixed.div(mixed.pow(2).sum(1, keepdim=True).pow(0.5)))
        self.steps += 1
        self.host_steps += 1

    @torch.no_grad()
    def fingerprint(self) -> Tensor:
        """Order-sensitive float64 checksums of the banks, Z and the step count."""
        w = torch.arange(1, self.num_samples + 1, device=self.memory_s.device, dtype=torch.float64)
        return torch.stack([(self.memory_s.double().sum(1) * w).sum(),
                            (self.memory_t.double().sum(1) * w).sum(),
                            self.z.double().sum(), self.steps.double()])

    @torch.no_grad()
    def check_replicas(self) -> None:
        """Collective: raise on every process when the banks differ between processes."""
        if not is_distributed():
            return
        prints = all_gather_cat(self.fingerprint().view(1, -1))
        if not bool((prints == prints[0]).all()):
            raise RuntimeError(
                "crd: the memory banks differ between processes (per-process checksums "
                f"{prints.tolist()}); every process must apply the same gathered updates")


def _refresh_host_copies(module: nn.Module, incompatible: object) -> None:
    module.host_steps = int(module.steps)  # type: ignore[arg-type]
    module.z_ready = bool((module.z >= 0).all())  # type: ignore[operator]


def gather_rows(t: Tensor, lengths: list[int] | None = None) -> tuple[Tensor, int, list[int]]:
    """Every process's rows of ``t`` concatenated in rank order (row counts may differ), the
    offset of this process's rows and every process's row count (``lengths``, when known,
    saves a collective); ``(t, 0, [len(t)])`` in a single process."""
    if not is_distributed():
        return t, 0, [t.shape[0]]
    if lengths is None:
        n = torch.tensor([t.shape[0]], device=t.device)
        lengths = [int(m) for m in all_gather_cat(n).tolist()]
    longest = max(lengths)
    padded = t
    if t.shape[0] < longest:
        padded = torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])
    parts = all_gather_cat(padded).split(longest)
    rows = torch.cat([p[:m] for p, m in zip(parts, lengths, strict=True)])
    return rows, sum(lengths[:rank()]), lengths


def last_occurrences(idx: Tensor) -> Tensor:
    """Positions of the last occurrence of each distinct value of ``idx`` (B,)."""
    order = torch.sort(idx, stable=True).indices
    ordered = idx[order]
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


def bank_bytes(num_samples: int, dim: int) -> int:
    """Bytes of both float32 banks (checkpointed as they are: an exact resume needs them)."""
    return 2 * num_samples * dim * 4

