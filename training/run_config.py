"""Typed run configuration: dataclass sections, YAML presets and `key=value` overrides.

A run is described by one `RunConfig` whose sections mirror fairseq's config groups (model,
criterion, data/task, optimization, checkpoint, logging). Presets are YAML files under
`training/configs/<name>.yaml` holding any subset of the sections; missing fields keep the
dataclass defaults below. Overrides are `section.field=value` strings (`seed=3`,
`optim.lr=1e-4`, `criterion.loss_weights=[0.1,10]`, `data.rlm=false`), parsed according to the
field's declared type. Unknown keys, in YAML files or overrides, raise `ConfigError` naming
the key and listing the valid ones.

Defaults are fairseq's global defaults (seed 1, clip_norm 0, patience -1, best metric
"loss") unless the paper's configs say otherwise; the presets carry the paper's values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ecgplat.atomic import write_text


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line."""


@dataclass
class ModelConfig:
    preset: str = "paper"  # "paper" | "small" | "tiny" (training.models presets)
    # None keeps the preset's value; names mirror fairseq's model.* options
    dropout: float | None = None
    attention_dropout: float | None = None
    activation_dropout: float | None = None
    dropout_input: float | None = None
    dropout_features: float | None = None
    feature_grad_mult: float | None = None
    mask_prob: float | None = None
    encoder_layers: int | None = None
    layer_norm_eps: float | None = None


@dataclass
class CriterionConfig:
    w2v: bool = True  # wav2vec 2.0 InfoNCE + extra losses
    cmsc: bool = True  # CMSC contrastive loss between the pair's segments
    loss_weights: list[float] = field(default_factory=lambda: [0.1, 10.0])  # diversity, feat. pen.
    num_negatives: int = 100
    logit_temp: float = 0.1
    cmsc_temp: float = 0.1  # criterion.temp
    cmsc_weight: float = 1.0  # criterion.cmsc_weights (None in the original = 1)
    cmsc_all_gather: bool = False  # model.all_gather (off in the paper: per-GPU negatives)
    arcface_scale: float = 192.0  # criterion.scale
    arcface_margin: float = 1.0  # criterion.margin


@dataclass
class DataConfig:
    shards: str = ""  # directory with <split>-NNNNNN.tar and _info.json
    train_split: str = "train"
    valid_split: str = "valid"
    store: str | None = None  # feature store, for validation / evaluation
    batch_size: int = 64  # pairs for pretraining, segments for fine-tuning
    num_workers: int = 1
    shuffle_buffer: int = 256
    rlm: bool = False  # random lead masking (task.perturbation_mode)
    rlm_mode: str = "random"  # task.mask_leads_selection: "random" | "conditional"
    rlm_prob: float = 0.5  # task.mask_leads_prob
    rlm_condition: list[int] = field(default_factory=lambda: [4, 5])  # task.mask_leads_condition
    leads: str = "12"  # task.leads_to_load: preset name or comma list
    epoch_batches: int | None = None  # batches per epoch per rank; None = from _info.json
    normalize: str = "none"  # per-record amplitude: "none" (paper) | "zscore" (training.normalize)


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled: p <- p - lr*wd*p, all parameters
    schedule: str = "fixed"  # "fixed" | "tri_stage" | "cosine"
    warmup_updates: int = 0  # fixed / cosine warmup length
    phase_ratio: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.7])  # tri_stage
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    max_update: int = 0  # 0 = no limit
    max_epoch: int = 0  # 0 = no limit
    update_freq: int = 1  # gradient accumulation steps
    clip_norm: float = 0.0  # 0 = no clipping


@dataclass
class FinetuneConfig:
    init: str = "none"  # model.model_path: checkpoint to start from, or "none"
    freeze_finetune_updates: int = 0  # encoder under no_grad while num_updates < this
    leakage_exclude_store: str | None = None


@dataclass
class HeadConfig:
    """The supervised head of `finetune` / `diagnosis` runs (training.tasks.supervised)."""

    task: str = "diagnosis"  # label set in the store (`ecgplat labels list`); diagnosis = CinC 26
    loss: str = "auto"  # auto (bce | ce | mse by kind) | bce | ce | mse | huber
    huber_delta: float = 1.0  # on the standardised target
    pos_weight: str = "none"  # BCE: none | auto (negatives / positives in train) | a number or list
    threshold_rule: str = "max_f1"  # per-class thresholds fitted on valid: max_f1 | youden | fixed


@dataclass
class CheckpointConfig:
    save_interval_updates: int = 0  # 0 = save at the end of every epoch only
    keep_last: int = 1  # numbered checkpoints kept besides last/best
    best_metric: str = "loss"
    maximize: bool = False
    patience: int = -1  # validations without improvement; <= 0 = off


@dataclass
class LoggingConfig:
    log_interval: int = 10  # updates between console/JSONL/W&B records
    wandb_mode: str = "offline"  # "offline" | "online" | "disabled"
    wandb_project: str = "ecgplat"


@dataclass
class RunConfig:
    task: str = "pretrain"  # "pretrain" | "diagnosis" | "finetune" | "identify"
    seed: int = 1
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    precision: str = "auto"  # "auto" (bf16 where native) | "fp32" | "bf16"
    compile: str = "auto"  # torch.compile of the layers: "auto" (where it pays) | "on" | "off"
    out: str = ""  # run directory
    model: ModelConfig = field(default_factory=ModelConfig)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # --- conversions --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, no tuples): YAML- and `torch.load(weights_only)`-safe."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "config") -> RunConfig:
        cfg = cls()
        _merge(cfg, d, prefix="", origin=origin)
        cfg.validate()
        return cfg

    def save_yaml(self, path: str | Path) -> None:
        """Replace `path` atomically: under torchrun the other ranks of a resumed run may be
        reading it while rank 0 writes it."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:
        """Check enumerated values and ranges; raises ConfigError."""
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("precision", self.precision, ("auto", "fp32", "bf16"))
        _choice("compile", self.compile, ("auto", "on", "off"))
        _choice("model.preset", self.model.preset, ("paper", "small", "tiny"))
        _choice("optim.schedule", self.optim.schedule, ("fixed", "tri_stage", "cosine"))
        _choice("data.rlm_mode", self.data.rlm_mode, ("random", "conditional"))
        _choice("data.normalize", self.data.normalize, ("none", "zscore"))
        _choice("head.loss", self.head.loss, ("auto", "bce", "ce", "mse", "huber"))
        _choice("head.threshold_rule", self.head.threshold_rule, ("max_f1", "youden", "fixed"))
        _choice("logging.wandb_mode", self.logging.wandb_mode, ("offline", "online", "disabled"))
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas: expected 2 values, got {self.optim.betas}")
        if len(self.optim.phase_ratio) != 3 or abs(sum(self.optim.phase_ratio) - 1.0) > 1e-6:
            raise ConfigError(
                f"optim.phase_ratio: expected 3 values summing to 1, got {self.optim.phase_ratio}"
            )
        if len(self.criterion.loss_weights) != 2:
            raise ConfigError(
                f"criterion.loss_weights: expected 2 values, got {self.criterion.loss_weights}"
            )
        if len(self.data.rlm_condition) != 2:
            raise ConfigError(
                f"data.rlm_condition: expected 2 values, got {self.data.rlm_condition}"
            )
        for key, value, low in (
            ("data.batch_size", self.data.batch_size, 1),
            ("optim.update_freq", self.optim.update_freq, 1),
            ("data.num_workers", self.data.num_workers, 0),
            ("logging.log_interval", self.logging.log_interval, 1),
            ("checkpoint.keep_last", self.checkpoint.keep_last, 0),
        ):
            if value < low:
                raise ConfigError(f"{key}: must be >= {low}, got {value}")
        if self.optim.schedule == "tri_stage" and self.optim.max_update <= 0:
            raise ConfigError("optim.schedule=tri_stage needs optim.max_update > 0")
        if self.optim.schedule == "cosine" and self.optim.max_update <= 0:
            raise ConfigError("optim.schedule=cosine needs optim.max_update > 0")


# --- loading ---------------------------------------------------------------------------------


def preset_dir() -> Path:
    """`training/configs`, the folder of the YAML presets."""
    return Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name (`w2v_cmsc_rlm`) or a path to a YAML file."""
    s = str(name_or_path)
    if s.endswith((".yaml", ".yml")) or "/" in s:
        p = Path(s)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        return p
    p = preset_dir() / f"{s}.yaml"
    if not p.is_file():
        raise ConfigError(f"unknown config preset '{s}'; available: {', '.join(preset_names())}")
    return p


def load_config(
    name_or_path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> RunConfig:
    """Defaults <- YAML preset/file (if given) <- `key=value` overrides; validated."""
    cfg = RunConfig()
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config sections")
        _merge(cfg, data, prefix="", origin=str(path))
    apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def apply_overrides(cfg: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """Apply `section.field=value` strings in place (values parsed by the field's type)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        target, name = _locate(cfg, key)
        setattr(target, name, _parse_value(key, raw, _field_types(type(target))[name]))
    return cfg


def valid_keys(section: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of RunConfig (or of one section)."""
    section = section if section is not None else RunConfig()
    keys = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# --- internals -------------------------------------------------------------------------------


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, allowed))}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, origin: str) -> ConfigError:
    return ConfigError(
        f"{origin}: unknown config key '{key}'; valid keys: {', '.join(valid_keys())}"
    )


def _locate(cfg: RunConfig, key: str) -> tuple[Any, str]:
    parts = key.split(".")
    target = cfg
    for part in parts[:-1]:
        sub = getattr(target, part, None) if part in _field_types(type(target)) else None
        if not dataclasses.is_dataclass(sub):
            raise _unknown(key, "override")
        target = sub
    name = parts[-1]
    if name not in _field_types(type(target)) or dataclasses.is_dataclass(getattr(target, name)):
        raise _unknown(key, "override")
    return target, name


def _merge(target: Any, data: dict, prefix: str, origin: str) -> None:
    types_ = _field_types(type(target))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise _unknown(key, origin)
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{key}' must be a mapping")
            _merge(current, value, f"{key}.", origin)
        else:
            setattr(target, name, _coerce(key, value, types_[name], origin))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def _parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse an override string for a field of type `tp`."""
    raw = raw.strip()
    base, optional = _strip_optional(tp)
    if optional and raw.lower() in _NONE:
        return None
    if typing.get_origin(base) in (list, tuple):
        text = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        items = [t.strip() for t in text.split(",") if t.strip()]
        return _coerce(key, items, base, "override")
    return _coerce(key, raw, base, "override")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(key: str, value: Any, tp: Any, origin: str) -> Any:
    """Convert a YAML value or override string to `tp`; ConfigError on mismatch."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in _NONE):
        if optional:
            return None
        raise ConfigError(f"{origin}: '{key}' may not be null")
    bad = ConfigError(f"{origin}: '{key}' expects {_type_name(base)}, got {value!r}")
    if typing.get_origin(base) in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(base)[:1]
        return [_coerce(key, v, item_tp, origin) for v in value]
    convert = _SCALARS.get(base)
    if convert is None:
        raise bad
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise bad from None


# Scalar converters: each raises ValueError (or TypeError) on a value of the wrong kind.


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):  # bool is an int subclass; `true` is not a count
        raise ValueError(value)
    if isinstance(value, int):
        return value
    f = float(value)  # "1e3" and 3.0 are ints, 2.5 is not
    if not f.is_integer():
        raise ValueError(value)
    return int(f)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def _to_str(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError(value)
    return str(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))
