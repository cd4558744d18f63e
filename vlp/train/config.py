"""Typed root configuration of a training run, one dataclass per Hydra group.

The composed Hydra config is merged into ``OmegaConf.structured(TrainConfig)``: a misspelt key or a value of
the wrong type fails there, before anything is built, with OmegaConf's message naming the full key. Values
that are well typed but impossible together (a queue without momentum, a fusion head count that does not
divide the text width, an image size the patch size does not divide) are then rejected by ``validate()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlp.data.config import DataConfig
from vlp.eval.config import RetrievalConfig
from vlp.model.config import ModelConfig

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp", "deepspeed", "single_device")
DEEPSPEED_STRATEGIES = ("deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _fail_unless(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine decay, stepped once per optimizer step."""

    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    total_steps: int | None = None  # None: the trainer's estimate from max_steps / max_epochs
    # Layer-wise decay: the top block group of each tower trains at lr, the one below at lr * decay, and so on.
    layer_decay: float = 1.0
    # Modules that start from scratch on top of pretrained towers train at lr * new_module_lr_mult.
    new_module_lr_mult: float = 1.0
    new_modules: list[str] = field(
        default_factory=lambda: [
            "fusion.blocks.*.cross_attn.*",
            "fusion.blocks.*.norm2.*",
            "vision_proj.*",
            "text_proj.*",
            "itm_head.*",
            "mlm_head.*",
        ]
    )
    # Parameters without weight decay besides every bias and norm weight (tensors of rank <= 1).
    no_decay: list[str] = field(
        default_factory=lambda: ["temp", "*pos_embed*", "*position_embeddings*", "*cls_token*", "*token_type*"]
    )
    # Distillation weight ramps from 0 to model.alpha over this many optimizer steps; None: the first epoch.
    alpha_ramp_steps: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # OmegaConf hands over a list

    def validate(self) -> None:
        checks = [
            (len(self.betas) == 2, "optim.betas must hold two values"),
            (self.lr > 0, "optim.lr must be positive"),
            (self.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (all(0 <= b < 1 for b in self.betas), "optim.betas must lie in [0, 1)"),
            (self.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must lie in [0, 1]"),
            (self.total_steps is None or self.total_steps > 0, "optim.total_steps must be positive or null"),
            (0 < self.layer_decay <= 1, "optim.layer_decay must lie in (0, 1] (1 disables it)"),
            (self.new_module_lr_mult > 0, "optim.new_module_lr_mult must be positive"),
            (self.alpha_ramp_steps is None or self.alpha_ramp_steps >= 0, "optim.alpha_ramp_steps must be >= 0"),
        ]
        for ok, message in checks:
            _fail_unless(ok, message)


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` that this project uses, plus the strategy and FLOPs settings."""

    accelerator: str = "cpu"
    devices: Any = 1  # an int, a list of device indices, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    strategy_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. FSDP sharding_strategy, DDP timeout
    precision: str = "32-true"
    max_epochs: int = 1
    max_steps: int = -1
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    deterministic: bool = False
    benchmark: bool | None = None
    log_every_n_steps: int = 10
    fast_dev_run: int = 0  # run this many batches, no checkpoints or loggers
    overfit_batches: float = 0.0
    limit_train_batches: float | None = None  # a fraction of the epoch, or (if > 1) a batch count
    sync_batchnorm: bool = False
    # Peak FLOP/s of one device for train/mfu; None: Lightning's table for known GPUs, no MFU on CPU.
    peak_flops: float | None = None

    def validate(self) -> None:
        checks = [
            (self.precision in PRECISIONS, f"trainer.precision must be one of {', '.join(PRECISIONS)}"),
            (
                self.strategy in STRATEGIES + DEEPSPEED_STRATEGIES,
                f"trainer.strategy must be one of {', '.join(STRATEGIES + DEEPSPEED_STRATEGIES)}",
            ),
            (self.max_epochs >= 1 or self.max_steps > 0, "trainer.max_epochs or trainer.max_steps must be positive"),
            (self.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches must be >= 1"),
            (self.gradient_clip_val is None or self.gradient_clip_val > 0, "trainer.gradient_clip_val must be > 0"),
            (self.log_every_n_steps >= 1, "trainer.log_every_n_steps must be >= 1"),
            (self.fast_dev_run >= 0, "trainer.fast_dev_run must be >= 0"),
            (self.peak_flops is None or self.peak_flops > 0, "trainer.peak_flops must be positive or null"),
            (
                self.accelerator != "cpu" or self.precision in ("32-true", "32", "bf16-mixed", "64-true"),
                "trainer.precision=16-mixed needs a GPU; use 32-true (or bf16-mixed) with trainer.accelerator=cpu",
            ),
            (
                self.accelerator != "cpu" or self.strategy not in ("fsdp", *DEEPSPEED_STRATEGIES),
                f"trainer.strategy={self.strategy} needs trainer.accelerator=gpu (use ddp on CPU)",
            ),
        ]
        for ok, message in checks:
            _fail_unless(ok, message)


@dataclass
class WandbConfig:
    project: str = "vlp"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    # auto: online when an API key is configured (WANDB_API_KEY or ~/.netrc), offline otherwise.
    mode: str = "auto"
    log_model: bool = False


@dataclass
class LoggerConfig:
    """CSV is always written (it feeds the plots); wandb and TensorBoard are optional extras."""

    csv: bool = True
    wandb: WandbConfig | None = None
    tensorboard: bool = False

    def validate(self) -> None:
        _fail_unless(self.csv, "logger.csv must stay true: the training curves are drawn from metrics.csv")
        if self.wandb is not None:
            _fail_unless(self.wandb.mode in WANDB_MODES, f"logger.wandb.mode must be one of {', '.join(WANDB_MODES)}")


@dataclass
class CheckpointConfig:
    dirpath: str = "checkpoints"  # relative paths are inside paths.output_dir
    every_n_train_steps: int = 0  # 0: at the end of every epoch
    keep_last: int = 2  # periodic checkpoints kept, newest first
    save_last: bool = True  # last.ckpt, what resume=true continues from
    monitor: str = "val/r_mean"  # the best checkpoint is kept by this metric
    mode: str = "max"
    save_best: bool = True


@dataclass
class ValConfig:
    """Retrieval validation: ITC-only ranking every time, the full ITM re-rank every few times and at the end."""

    every_n_steps: int = 0  # 0: at the end of every `every_n_epochs` epochs
    every_n_epochs: int = 1
    rerank_every: int = 5  # every n-th validation re-ranks with ITM; 0: only the final one
    rerank_at_end: bool = True
    enabled: bool = True


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    val: ValConfig = field(default_factory=ValConfig)
    progress_bar: str = "tqdm"  # tqdm, rich or none
    plots: bool = True  # training curves to <output_dir>/curves.png at the end of fit
    throughput: bool = True  # train/samples_per_sec, train/step_time, train/mfu

    def validate(self) -> None:
        ckpt, val = self.checkpoint, self.val
        checks = [
            (ckpt.every_n_train_steps >= 0, "callbacks.checkpoint.every_n_train_steps must be >= 0"),
            (ckpt.keep_last >= 1, "callbacks.checkpoint.keep_last must be >= 1"),
            (ckpt.mode in ("min", "max"), "callbacks.checkpoint.mode must be 'min' or 'max'"),
            (val.every_n_steps >= 0, "callbacks.val.every_n_steps must be >= 0"),
            (val.every_n_epochs >= 1, "callbacks.val.every_n_epochs must be >= 1"),
            (val.rerank_every >= 0, "callbacks.val.rerank_every must be >= 0"),
            (self.progress_bar in ("tqdm", "rich", "none"), "callbacks.progress_bar must be tqdm, rich or none"),
        ]
        for ok, message in checks:
            _fail_unless(ok, message)


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_root: str = "../shared/data"
    weights_dir: str = "weights"
    output_dir: str = "outputs"
    log_dir: str = "logs"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: RetrievalConfig = field(default_factory=RetrievalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    tags: list[str] = field(default_factory=list)
    seed: int = 42
    ckpt: str | None = None  # continue from this checkpoint (full state: weights, optimizer, step, data position)
    # "resume": ckpt is the full training state; "init": ckpt (Lightning file or export dir) gives only the weights,
    # as fine-tuning does (ViT position embeddings are resampled, old key layouts remapped).
    ckpt_mode: str = "resume"
    ckpt_allow_shape_mismatch: bool = False  # with ckpt_mode=init: drop tensors whose shape changed, do not fail
    test_at_end: bool = False  # evaluate the best checkpoint (else the last weights) on the test split after fit
    resume: bool = False  # continue from <output_dir>/<checkpoint.dirpath>/last.ckpt when it exists
    optimized_metric: str | None = None  # returned by train.py for Hydra sweepers, e.g. val/r_mean

    def validate(self) -> None:
        """Every group's own checks, then the combinations that span groups."""
        self.model.validate()
        self.data.validate()
        self.eval.validate()
        for part in (self.optim, self.trainer, self.logger, self.callbacks):
            part.validate()
        _check_data_model(self)
        _check_fusion_width(self.model)
        _fail_unless(self.ckpt is None or not self.resume, "set either ckpt=PATH or resume=true, not both")
        _fail_unless(self.ckpt_mode in ("resume", "init"), "ckpt_mode must be 'resume' or 'init'")
        _fail_unless(self.ckpt_mode == "resume" or self.ckpt is not None, "ckpt_mode=init needs ckpt=PATH")


def _check_data_model(cfg: TrainConfig) -> None:
    # The data pipeline resizes to data.image_size; the image tower is built for model.image_encoder.image_size.
    image = cfg.model.image_encoder
    _fail_unless(
        cfg.data.image_size == image.image_size,
        f"data.image_size={cfg.data.image_size} differs from model.image_encoder.image_size={image.image_size}; "
        "set them equal",
    )
    _fail_unless(
        cfg.data.max_length <= cfg.model.text_encoder.max_length,
        f"data.max_length={cfg.data.max_length} exceeds model.text_encoder.max_length="
        f"{cfg.model.text_encoder.max_length}; captions would be longer than the text tower accepts",
    )
    patch = patch_size(image.name, image.timm_kwargs)
    _fail_unless(
        patch is None or image.image_size % patch == 0,
        f"model.image_encoder.image_size={image.image_size} is not divisible by the patch size {patch} of "
        f"{image.name}; choose a multiple of {patch}",
    )


def patch_size(name: str, timm_kwargs: dict[str, Any]) -> int | None:
    """The ViT patch size from timm_kwargs or the model name (``vit_base_patch16_224``); None for CNNs."""
    if "patch_size" in timm_kwargs:
        return int(timm_kwargs["patch_size"])
    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else None


def _check_fusion_width(model: ModelConfig) -> None:
    # Only a randomly initialised text tower has a width known before it is built; pretrained ones are
    # checked when the fusion encoder is built (vlp.model.fusion.Attention raises with the same key).
    width = model.text_encoder.config.get("hidden_size") if model.text_encoder.name is None else None
    heads = model.fusion.num_heads or model.text_encoder.config.get("num_attention_heads")
    if width is None or heads is None:
        return
    _fail_unless(
        width % heads == 0,
        f"the fusion width (model.text_encoder.config.hidden_size={width}) is not divisible by "
        f"model.fusion.num_heads={heads}",
    )


def load_config(cfg: DictConfig | dict) -> TrainConfig:
    """Merge a composed config into the typed schema, resolve it and validate it; errors name the key."""
    if isinstance(cfg, DictConfig) and "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        OmegaConf.resolve(merged)
        root: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ValueError(f"invalid config key {key!r}: {reason}") from err
    root.validate()
    return root


def to_plain_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain Python containers (for checkpoints' hyper_parameters and config.yaml)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def model_config_from_dict(values: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from ``checkpoint['hyper_parameters']['cfg']['model']``."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), values))
