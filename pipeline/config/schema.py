"""The typed run spec that a YAML config is validated into.

Every key a config may hold is a field here (or in a method's ``Options``); the loader in
``pipeline.config.load`` checks names and types against these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataSpec:
    # imagefolder (ImageNet layout), tiny_imagenet, cifar10, cifar100, stl10, demo, synthetic
    dataset: str = "demo"
    root: str = "data/demo"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["val"])
    backend: Literal["torchvision", "dali", "ffcv", "nvjpeg"] = "torchvision"
    # cifar (pad 4, crop 32, flip), tiny_imagenet (pad 8, crop 64, flip), imagenet (RRC, flip)
    augment: Literal["cifar", "tiny_imagenet", "imagenet", "none"] = "cifar"
    image_size: int = 32
    flip: bool = True  # random horizontal flip in training
    eval_resize: int = 0  # imagenet eval: resize shorter side to this, then centre crop image_size
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    rrc_ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])
    mean: list[float] = field(default_factory=lambda: [0.5071, 0.4867, 0.4408])
    std: list[float] = field(default_factory=lambda: [0.2675, 0.2565, 0.2761])
    batch_size: int = 64  # per process
    eval_batch_size: int = 128  # per process
    workers: int = 2
    # Decoded training and evaluation images kept in memory per process, up to this many MiB
    # (0: off): a small image-file dataset is decoded once, not every epoch. With workers > 0
    # each loader process keeps its own for one epoch, so it helps most with workers: 0.
    ram_cache_mb: int = 512
    # Augmentation views per sample: epoch e uses view e mod views; 0 means a fresh view each epoch.
    views: int = 0
    # Rotated copies of each training image (pipeline/data/rotate.py): 4 = 0/90/180/270°,
    # interleaved per image; 1 = none; 0 = as the method asks (4 for sskd, hsakd and their
    # teacher phases, 1 otherwise).
    rotations: int = 0
    # Training batch order (pipeline/data/coss_sampler.py): default = shuffled samples; coss =
    # CoSS nearest-neighbour batches (spec §4.3): batch_size/(1+coss_k) anchors per process and
    # step, each followed by coss_k neighbours drawn without replacement from its top coss_m in
    # the ``neighbours`` file (launch/neighbours.py). coss_k = 0: plain shuffled batches.
    sampler: Literal["default", "coss"] = "default"
    coss_k: int = 15  # nearest_k of the official CFBatchSampler
    coss_m: int = 31  # total_k
    neighbours: str | None = None  # <teacher cache>/neighbours_top<N>.npy
    num_classes: int = 0  # 0: take it from the dataset index
    # Which samples of the training split a run trains on (pipeline/data/subset.py); the
    # evaluation splits stay complete. Part of the training index's fingerprint.
    train_fraction: float = 1.0  # stratified: round(f·n_c) samples of every class c (CID Table 6)
    drop_classes: list[int] = field(default_factory=list)  # class ids removed from training
    drop_classes_keep: int = 0  # samples kept per dropped class: 0 zero-shot, k few-shot
    subset_seed: int = 0  # draws which samples are kept (not the run's seed: same data per seed)
    synthetic_size: int = 256  # samples per split for dataset: synthetic
    # backend: dali — decode on the GPU when CUDA is present (auto), or force gpu / cpu.
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"
    # backend: ffcv — folder of <split>.beton files (tools/write_ffcv.py); "": <root>/ffcv.
    ffcv_dir: str = ""
    # backend: ffcv — FFCV's own RandomResizedCrop + flip instead of the plan (training only):
    # not reproducible, and batches do not match a teacher cache.
    ffcv_random_crop: bool = False
    # backend: nvjpeg — workers read the JPEG bytes, batches are decoded (torchvision.io,
    # nvJPEG) and cropped on the GPU when CUDA is present (auto), or force gpu / cpu.
    nvjpeg_device: Literal["auto", "gpu", "cpu"] = "auto"


@dataclass
class ModelSpec:
    arch: str = "resnet8"
    # None, a checkpoint path, or "torchvision:<WEIGHTS_ENUM>" (e.g. torchvision:IMAGENET1K_V1)
    weights: str | None = None


@dataclass
class TeacherSpec:
    arch: str = ""
    weights: str | None = None
    source: Literal["online", "cached"] = "online"
    cache_dir: str | None = None
    # Teacher cache (launch/cache_teacher.py, pipeline/teacher/cache_format.py):
    cache_fields: list[str] = field(default_factory=list)  # []: the fields the method needs
    # stage maps to cache (indices of Net.stage_info, negative from the end); []: the method's
    cache_stages: list[int] = field(default_factory=list)
    cache_topk: int = 0  # 0: full fp16 logits; k: top-k probabilities at the method's T
    cache_eval_view: bool = False  # also cache the deterministic eval view of every train sample
    cache_chunk: int = 4096  # rows per chunk (the unit of work, completion and checksums)
    # teacher.source: cached — batches whose rows a thread reads ahead of the step (0: none)
    cache_prefetch: int = 2


@dataclass
class OptimSpec:
    name: Literal["sgd"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # no weight decay on BN and bias parameters (off in the papers' recipes)
    no_decay_bn_bias: bool = False
    epochs: int = 240
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    grad_accum: int = 1
    clip_grad_norm: float = 0.0  # 0: no clipping


@dataclass
class TrainSpec:
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    channels_last: bool = False
    cpu: bool = False  # force CPU even where CUDA is present
    deterministic: bool = False
    eval_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    log_every_steps: int = 20
    progress: bool = True
    max_steps_per_epoch: int = 0  # 0: whole epoch (used by short smoke runs)
    # Seconds a collective may wait for a peer before the process fails (a hung or lost process
    # otherwise blocks the others; a killed one usually surfaces sooner as a connection error).
    dist_timeout_s: int = 1800
    # Resume a run directory with a config that differs from the one it was started with: the
    # change is recorded as a new config version (pipeline/train/resume_guard.py).
    allow_config_change: bool = False
    # Processes agree on a SIGUSR1/SIGTERM stop every this many steps (and at an epoch's last
    # step): the agreement is a collective plus a host read, which waits for the GPU's queue.
    stop_check_every_steps: int = 50
    # torch.compile the student and an online teacher; the first step's extra time is logged.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"


@dataclass
class TrackingSpec:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlruns.db
    uri: str | None = None
    artifact_dir: str | None = None  # None: <project>/mlartifacts
    experiment: str = "kd"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None  # nest this run under another (the study tool's parent)
    # the trained network as the run's MLflow model (pipeline/track/model_log.py); a torch.export
    # trace and an upload of the weights at the end of the run
    log_model: bool = True


@dataclass
class RunSpec:
    name: str = "run"
    seed: int = 0
    run_dir: str | None = None  # None: runs/<name>
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    teacher: TeacherSpec | None = None
    # method: {name: <registered method>, ...that method's Options}
    method: dict[str, Any] = field(default_factory=lambda: {"name": "vanilla"})
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
