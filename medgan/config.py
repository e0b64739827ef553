"""The typed config tree: YAML in ``configs/``, overridden by CLI flags, validated, saved beside checkpoints.

Every section is a ``@dataclass(kw_only=True, slots=True)`` checked in ``__post_init__``; a bad value or an
unknown key raises :class:`ConfigError` with one line that names the key (``training.lr_g: ...``).

The YAML file is read first; command-line flags override it, the later flag winning: the seed project's
flags (``--batch_size``, ``--lr_g``, ...; see :data:`SEED_FLAGS`) and any key as ``--section.key value``
(``--deepspeed.zero_stage 3``, ``--model.generator.use_attention false``, ``--data.input_modalities t1 t2``).
The DeepSpeed launcher's
``--local_rank`` is accepted and ignored: rank and world size are read once from the environment elsewhere.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_prep.errors import ConfigError
from data_prep.volumes import MODALITIES, canonical_modality
from medgan.models.config_checks import require as _check
from medgan.models.config_checks import require_choice as _check_choice
from medgan.models.discriminator import DiscriminatorConfig
from medgan.models.generator import GeneratorConfig

__all__ = ["Config", "ConfigError", "config_from_cli", "load_config", "build_config"]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The two networks; their own configs live beside them in ``medgan/models/``."""

    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the shards are and which synthesis task to train.

    ``target_modality: any`` trains one model for every task: per sample a random non-empty subset of the
    present modalities as input and a random other present one as target. A named target with
    ``input_modalities`` is the seed's fixed task (empty ``input_modalities``: every other present one).

    ``slab_slices`` (S): a training sample is S consecutive axial slices of one subject, one task and one
    flip for the whole slab (1: single slices, as before slabs existed). ``batch_size`` counts slices per
    rank whatever S is (a multiple of S: batch 16 with S 8 is two slabs), and so does ``shuffle_buffer``
    (it holds ``shuffle_buffer // S`` slabs). Slabs, and 2.5D input (``model.generator.context_slices``),
    need shards of layout 2 (each subject in one tar file), which ``python -m data_prep shard`` writes.
    """

    data_path: str = ""
    input_modalities: list[str] = field(default_factory=list)
    target_modality: str = "any"
    batch_size: int = 4
    num_workers: int = 1
    shuffle_buffer: int = 256
    random_flips: bool = True
    slab_slices: int = 1

    def __post_init__(self) -> None:
        self.input_modalities = [canonical_modality(name) for name in self.input_modalities]
        self.target_modality = canonical_modality(self.target_modality)
        for name in self.input_modalities:
            _check_choice(name, "data.input_modalities", MODALITIES)
        _check(
            len(set(self.input_modalities)) == len(self.input_modalities),
            "data.input_modalities",
            f"{self.input_modalities} repeats a modality",
        )
        _check_choice(self.target_modality, "data.target_modality", ("any", *MODALITIES))
        _check(
            self.target_modality not in self.input_modalities,
            "data.target_modality",
            f"{self.target_modality!r} is also an input modality",
        )
        _check(
            not (self.input_modalities and self.target_modality == "any"),
            "data.input_modalities",
            "fixed inputs need a fixed --target_modality (not 'any')",
        )
        _check(self.batch_size >= 1, "data.batch_size", f"{self.batch_size} must be >= 1 (per rank)")
        _check(self.num_workers >= 0, "data.num_workers", f"{self.num_workers} must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", f"{self.shuffle_buffer} must be >= 1")
        _check(1 <= self.slab_slices <= 256, "data.slab_slices", f"{self.slab_slices} must be in 1..256")
        _check(
            self.batch_size % self.slab_slices == 0,
            "data.batch_size",
            f"{self.batch_size} slices per rank is not a whole number of slabs of data.slab_slices "
            f"{self.slab_slices} (make it a multiple of {self.slab_slices})",
        )


@dataclass(kw_only=True, slots=True)
class TrainingConfig:
    """Optimisation. The LR schedule is the seed's constant-then-step decay (every ``lr_decay_epoch``
    epochs multiply by ``lr_decay_factor``) or ``linear`` decay to zero over the second half of training.

    ``tumour_l1_weight`` (``w >= 0``): the generator's L1 is ``mean(weight * |fake - real|)`` over every
    pixel of the batch, with ``weight = 1 + w`` where the segmentation is non-zero (any tumour label) and 1
    elsewhere (and everywhere on a slice without a segmentation); ``w = 0`` is the plain mean L1.

    ``adversarial_weight``: the generator's loss is ``adversarial_weight * adversarial + l1_weight * L1``;
    0 trains an L1-only generator (the discriminator is then neither run nor updated).
    ``cpu_budget_seconds``: training stops (with validation and a checkpoint, as at ``max_steps``) once
    the training loop (data, forward, backward, optimizer and EMA steps; not validation or saving) has
    used this many seconds of the process's CPU time on any rank, counted across resumes; 0: no budget.
    A budget needs ``data.num_workers: 0``: DataLoader workers are other processes whose CPU time the
    budget cannot count whole (it reaches this process only when they exit, and includes batches
    prefetched past the last step).
    Equal CPU time, not equal steps, is how ``bench/study.py`` compares generators of different speed.
    ``val_max_subjects``: validation reads the first this many val subjects in the split's order (0: the
    whole val split) and scores those that serve the task (all, for ``target_modality: any``).
    Validation scores whole volumes, each subject on one rank with a task that is a function of the
    subject, so its scores do not depend on the world size.
    """

    epochs: int = 100
    max_steps: int = 0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    lr_schedule: str = "step"
    lr_decay_epoch: int = 50
    lr_decay_factor: float = 0.5
    gan_loss: str = "lsgan"
    l1_weight: float = 100.0
    tumour_l1_weight: float = 0.0
    adversarial_weight: float = 1.0
    cpu_budget_seconds: float = 0.0
    ema: bool = True
    ema_decay: float = 0.999
    seed: int = 0
    val_every_steps: int = 500
    val_max_subjects: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "training.epochs", f"{self.epochs} must be >= 1")
        _check(self.max_steps >= 0, "training.max_steps", f"{self.max_steps} must be >= 0 (0: no limit)")
        _check(self.lr_g > 0, "training.lr_g", f"{self.lr_g} must be > 0")
        _check(self.lr_d > 0, "training.lr_d", f"{self.lr_d} must be > 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "training.betas",
            f"{self.betas} must be two numbers in [0, 1)",
        )
        _check_choice(self.lr_schedule, "training.lr_schedule", ("step", "linear", "constant"))
        _check(self.lr_decay_epoch >= 1, "training.lr_decay_epoch", f"{self.lr_decay_epoch} must be >= 1")
        _check(
            0 < self.lr_decay_factor <= 1,
            "training.lr_decay_factor",
            f"{self.lr_decay_factor} must be in (0, 1]",
        )
        _check_choice(self.gan_loss, "training.gan_loss", ("lsgan", "hinge"))
        _check(self.l1_weight >= 0, "training.l1_weight", f"{self.l1_weight} must be >= 0")
        _check(
            self.tumour_l1_weight >= 0, "training.tumour_l1_weight", f"{self.tumour_l1_weight} must be >= 0"
        )
        _check(
            self.adversarial_weight >= 0,
            "training.adversarial_weight",
            f"{self.adversarial_weight} must be >= 0 (0: L1 only)",
        )
        _check(
            self.cpu_budget_seconds >= 0,
            "training.cpu_budget_seconds",
            f"{self.cpu_budget_seconds} must be >= 0 (0: no budget)",
        )
        _check(0 < self.ema_decay < 1, "training.ema_decay", f"{self.ema_decay} must be in (0, 1)")
        _check(self.val_every_steps >= 1, "training.val_every_steps", f"{self.val_every_steps} must be >= 1")
        _check(
            self.val_max_subjects >= 0, "training.val_max_subjects", f"{self.val_max_subjects} must be >= 0"
        )


@dataclass(kw_only=True, slots=True)
class DeepSpeedConfig:
    """The DeepSpeed settings this project exposes; the engine turns them into DeepSpeed's dict in one place.

    ``precision``: ``bf16`` (CPU and Ampere+ GPUs), ``fp16`` (GPU only, dynamic loss scaling) or ``fp32``.
    """

    zero_stage: int = 0
    precision: str = "fp32"
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    offload_optimizer: bool = False

    def __post_init__(self) -> None:
        _check(
            self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"{self.zero_stage} must be 0, 1, 2 or 3"
        )
        _check_choice(self.precision, "deepspeed.precision", ("fp32", "bf16", "fp16"))
        _check(
            self.gradient_accumulation_steps >= 1,
            "deepspeed.gradient_accumulation_steps",
            f"{self.gradient_accumulation_steps} must be >= 1",
        )
        _check(
            self.gradient_clipping >= 0,
            "deepspeed.gradient_clipping",
            f"{self.gradient_clipping} must be >= 0 (0: off)",
        )


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """Experiment tracking on rank 0. ``wandb: auto`` is online with an API key, offline without one."""

    wandb: str = "auto"
    project: str = "medgan-ssm"
    run_name: str = ""
    log_every_steps: int = 10
    image_every_steps: int = 500
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check_choice(self.wandb, "logging.wandb", ("auto", "online", "offline", "disabled"))
        _check(self.log_every_steps >= 1, "logging.log_every_steps", f"{self.log_every_steps} must be >= 1")
        _check(
            self.image_every_steps >= 1, "logging.image_every_steps", f"{self.image_every_steps} must be >= 1"
        )


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Checkpoint folder (DESIGN.md layout), how often to save, and how many step tags to keep."""

    dir: str = "runs/default"
    file: str = ""
    every_steps: int = 500
    keep_last: int = 3
    resume: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.dir), "checkpoint.dir", "must not be empty")
        _check(self.every_steps >= 1, "checkpoint.every_steps", f"{self.every_steps} must be >= 1")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"{self.keep_last} must be >= 1")


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole run: one tree, printed once at start and saved as ``CKPT_DIR/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        modalities = self.model.generator.modalities
        for name in [*self.data.input_modalities, self.data.target_modality]:
            _check(
                name == "any" or name in modalities,
                "data",
                f"modality {name!r} is not in model.generator.modalities {modalities}",
            )
        # the budget counts this process's CPU time only; workers would spend theirs unseen
        _check(
            not (self.training.cpu_budget_seconds and self.data.num_workers),
            "training.cpu_budget_seconds",
            f"{self.training.cpu_budget_seconds:g} needs data.num_workers 0 (got {self.data.num_workers}): "
            "DataLoader workers' CPU time is not counted",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# The seed project's flag names and where each lands in the tree.
SEED_FLAGS: dict[str, str] = {
    "data_path": "data.data_path",
    "checkpoint_dir": "checkpoint.dir",
    "checkpoint_file": "checkpoint.file",
    "batch_size": "data.batch_size",
    "epochs": "training.epochs",
    "lr_g": "training.lr_g",
    "lr_d": "training.lr_d",
    "lr_decay_epoch": "training.lr_decay_epoch",
    "lr_decay_factor": "training.lr_decay_factor",
    "input_modalities": "data.input_modalities",
    "target_modality": "data.target_modality",
    "num_workers": "data.num_workers",
}


def _means_empty(value: Any) -> bool:
    """How a command line clears a list: ``--data.input_modalities []`` (or ``none``, ``null``, ``''``)."""
    return isinstance(value, str) and value.strip().lower() in ("", "[]", "none", "null")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML or CLI value into the field's declared type, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if value is None or (isinstance(value, list) and len(value) == 1 and _means_empty(value[0])):
            value = []
        if isinstance(value, str):
            value = [] if _means_empty(value) else value.replace(",", " ").split()
        _check(isinstance(value, (list, tuple)), key, f"{value!r} is not a list")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        _check(
            text in ("true", "false", "1", "0", "yes", "no", "on", "off"), key, f"{value!r} is not a boolean"
        )
        return text in ("true", "1", "yes", "on")
    if annotation is int:
        _check(not isinstance(value, bool), key, f"{value!r} is not an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not an integer") from None
        _check(as_float.is_integer(), key, f"{value!r} is not an integer")
        return int(as_float)
    if annotation is float:
        _check(not isinstance(value, bool), key, f"{value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if annotation is str:
        _check(not isinstance(value, (dict, list)), key, f"{value!r} is not a string")
        return "" if value is None else str(value)
    raise TypeError(f"{key}: unsupported field type {annotation!r}")


# Keys a released version had and this one does not: a saved config (a checkpoint's) drops them, a user's
# config or command line is told what replaced each.
RETIRED_KEYS: dict[str, str] = {
    "training.val_max_batches": (
        "retired: validation scores whole volumes now; cap it with training.val_max_subjects"
    ),
}


def _build(cls: type, values: dict[str, Any], prefix: str, saved: bool = False) -> Any:
    """Build dataclass ``cls`` from a nested dict, recursing into sections; unknown keys are errors, and so
    are retired ones unless ``saved`` (a checkpoint's config, valid when it was written)."""
    _check(isinstance(values, dict), prefix or "config", f"expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(values)
    for name in list(values):
        key = f"{prefix}.{name}" if prefix else str(name)
        if key in RETIRED_KEYS and name not in known:
            _check(saved, key, RETIRED_KEYS[key])
            del values[name]
            continue
        _check(name in known, key, f"unknown config key (known here: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key, saved)
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def _set_nested(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    *sections, leaf = dotted_key.split(".")
    node = tree
    for section in sections:
        child = node.setdefault(section, {})
        _check(isinstance(child, dict), dotted_key, f"{section!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split CLI tokens into (``--config`` path, nested overrides dict).

    A flag takes every following token up to the next ``--flag``: one token is a scalar, several a list
    (``--data.input_modalities t1 t2``). ``--flag=value`` works too. ``--local_rank`` is dropped.
    """
    config_path: str | None = None
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --section.key value")
        flag, eq, inline = token[2:].partition("=")
        values = [inline] if eq else []
        index += 1
        while not eq and index < len(argv) and not argv[index].startswith("--"):
            values.append(argv[index])
            index += 1
        if flag in ("local_rank", "local-rank"):
            continue
        if not values:
            raise ConfigError(f"--{flag}: needs a value")
        value: Any = values[0] if len(values) == 1 else values
        if flag == "config":
            config_path = str(value)
            continue
        if flag in SEED_FLAGS:
            key = SEED_FLAGS[flag]
        elif "." in flag:
            key = flag
        else:
            seed = ", ".join(f"--{k}" for k in SEED_FLAGS)
            raise ConfigError(f"--{flag}: unknown flag (use --section.key value, or one of {seed})")
        if key == "data.input_modalities" and isinstance(value, str):
            value = [value]
        _set_nested(overrides, key, value)
    return config_path, overrides


# the key with which a config file names the file it starts from (read_yaml)
BASE_KEY = "base"


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config YAML into a dict; a missing or malformed file is a one-line ConfigError.

    A file may start from another: ``base: brats.yaml`` (a path relative to the file) reads that file
    first and merges this one's keys over it, section by section (a variant of a config without a copy of
    it); the base may have its own base."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else "invalid YAML"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first_line}") from None
    loaded = loaded or {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections, not {type(loaded).__name__}"
        )
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(path)!r}: {BASE_KEY} must be a file name, not {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"config file {str(path)!r}: its {BASE_KEY} {base!r} does not exist ({base_path})")
    including = (*_including, path.resolve())
    if base_path.resolve() in including:
        chain = " -> ".join(str(p.name) for p in (*including, base_path))
        raise ConfigError(f"config file {str(path)!r}: {BASE_KEY} files form a cycle ({chain})")
    return _merge(read_yaml(base_path, including), loaded)


def build_config(values: dict[str, Any] | None = None, saved: bool = False) -> Config:
    """Build and validate a :class:`Config` from a nested dict (missing keys keep their defaults);
    ``saved``: the dict is a checkpoint's saved config, whose retired keys (:data:`RETIRED_KEYS`) are
    dropped instead of refused."""
    return _build(Config, values or {}, "", saved)


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, saved: bool = False
) -> Config:
    """YAML file (optional) merged with a nested overrides dict, validated (``saved``: as build_config)."""
    values = read_yaml(path) if path else {}
    return build_config(_merge(values, overrides or {}), saved)


def config_from_cli(argv: list[str]) -> Config:
    """The whole CLI path: ``--config X.yaml`` plus seed flags and ``--section.key value`` overrides."""
    config_path, overrides = parse_overrides(argv)
    return load_config(config_path, overrides)
