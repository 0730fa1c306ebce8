"""Study/run configuration: Hydra composition, command-line overrides, validation.

A study file may start from a base file through Hydra's ``defaults`` list;
the result is merged over ``ablate/conf/base.yaml``, then ``key=value``
overrides (Hydra's override grammar) are applied. Validation walks the closed
sections and reports every problem at once, with the file and key path.
``name`` must be a plain name, written out (it becomes folders and MLflow
records); :func:`check_values` checks values for meaning (ranges, choices).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

BASE = Path(__file__).parent / "conf" / "base.yaml"
OPEN_SECTIONS = {"data", "design"}  # plugin options: checked by the registries instead
#: Written as integers in base.yaml, but fractions are meaningful (Ray: 0.25 GPU, 0.5 CPU per trial).
NUMBER_KEYS = {"resources.cpus_per_trial", "resources.gpus_per_trial"}
OPEN_PATHS = {"eval.extractor", "search.grid", "search.space", "search.seeds"}  # checked by their owners
# (eval.extractor: its registry; search.*: ablate.run; search.seeds: an int or {min, max, step}, ablate.race)


def _under_open_path(key: str) -> str | None:
    return next((p for p in OPEN_PATHS if key == p or key.startswith(p + ".")), None)


class ConfigError(ValueError):
    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source, self.problems = source, problems
        super().__init__("\n".join(f"{source}: {k}: {m}" for k, m in problems))


def base_config() -> DictConfig:
    return OmegaConf.load(BASE)


def compose(target: str | None, overrides: list[str] = (), extra_base: DictConfig | None = None) -> tuple[DictConfig, str]:
    """(config, source) from a study file path, a preset name, or nothing (the base config)."""
    base = base_config()
    if extra_base is not None:
        base = OmegaConf.merge(base, extra_base)
    source, named_by_file = "<defaults>", False
    if target is None:
        cfg = base.copy()
    elif target.endswith((".yaml", ".yml")) or Path(target).exists():
        path = Path(target)
        source = str(path)
        if not path.is_file():
            raise ConfigError(source, [("", "study file not found")])
        study = _hydra_compose(path)
        problems = check_keys(study, base)
        if problems:
            raise ConfigError(source, problems)
        cfg = OmegaConf.merge(base, study)
        if _raw(cfg, "name") is None:  # never resolved here: check_name refuses interpolations
            cfg.name, named_by_file = path.stem, True
    else:  # a preset name
        cfg = base.copy()
        cfg.design = OmegaConf.create({"preset": target})
        cfg.name = target
        source = f"preset '{target}'"
    problems = apply_overrides(cfg, list(overrides), base)
    if problems:
        raise ConfigError("command line", problems)
    named_by_file = named_by_file and not any(str(o).lstrip("+").split("=", 1)[0] == "name" for o in overrides)
    problems = check_name(cfg, from_file_name=named_by_file)
    if problems:
        raise ConfigError(source, problems)
    return cfg, source


#: A study/run name names folders (runs/<name>, <storage>/<name>) and MLflow records: a plain name only.
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
NAME_RULE = ("a plain name: letters, digits, '-', '_' and '.', at most 128 characters, not starting with '.' "
             "(it names the study's folders and MLflow records)")


def check_name(cfg: DictConfig, from_file_name: bool = False) -> list[tuple[str, str]]:
    """``name`` is a plain name, written out (no interpolation): checked before anything runs or is written."""
    raw = _raw(cfg, "name")
    if raw is None:
        return []
    if isinstance(raw, int) and not isinstance(raw, bool):
        cfg.name = raw = str(raw)
    if isinstance(raw, str) and ("${" in raw or OmegaConf.is_interpolation(cfg, "name")):
        return [("name", f"interpolations are not allowed here, got {raw!r}: the name is a path and must be the same "
                         f"on every run (it is what a rerun resumes); write {NAME_RULE}")]
    if not isinstance(raw, str) or not NAME_RE.fullmatch(raw):
        where = " (from the file name: set name: in the file)" if from_file_name else ""
        return [("name", f"must be {NAME_RULE}, got {raw!r}{where}")]
    return []


def _raw(cfg: DictConfig, key: str):
    """The value of ``key`` as written (an interpolation stays a string), or None."""
    node = cfg._get_node(key) if key in cfg else None
    return None if node is None else node._value()


def _hydra_compose(path: Path) -> DictConfig:
    from hydra import compose as hcompose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base="1.3"):
            cfg = hcompose(config_name=path.stem)
    except Exception as exc:  # hydra's own errors name the missing file or bad syntax
        raise ConfigError(str(path), [("", f"cannot compose: {exc}")]) from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(cfg, False)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: list[str], base: DictConfig) -> list[tuple[str, str]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    problems = []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        return [("", f"bad override: {exc}")]
    for ov in parsed:
        key = ov.key_or_group.lstrip("+")
        if ov.is_delete():
            problems.append((key, "deleting keys is not supported"))
            continue
        value = ov.value()
        section = key.split(".")[0]
        open_path = _under_open_path(key)
        if (section not in OPEN_SECTIONS and open_path is None
                and OmegaConf.select(base, key, default="__missing__") == "__missing__"):
            problems.append((key, REMOVED_KEYS.get(key) or f"unknown key; valid keys here: {_siblings(base, key)}"))
            continue
        if open_path and key != open_path and isinstance(OmegaConf.select(cfg, open_path), str):
            OmegaConf.update(cfg, open_path, {"name": OmegaConf.select(cfg, open_path)}, merge=False)
        OmegaConf.update(cfg, key, _plain(value), merge=True, force_add=True)
    problems += check_keys(cfg, base)
    return problems


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _siblings(base: DictConfig, key: str) -> str:
    parent = ".".join(key.split(".")[:-1])
    node = OmegaConf.select(base, parent) if parent else base
    return ", ".join(node.keys()) if isinstance(node, DictConfig) else "(none)"


#: keys that were removed, with what replaces them (the message a config still setting one gets)
REMOVED_KEYS = {
    "train.class_consistent": "removed: use train.classes_per_batch instead (k same-class groups per batch; "
                              "1: the old class_consistent=true, one class per batch; 0: i.i.d. batches; "
                              "null: the preset's choice, esc: 8)",
}


def check_keys(cfg: DictConfig, base: DictConfig, prefix: str = "") -> list[tuple[str, str]]:
    """Unknown keys and wrong types in the closed sections (everything but data/design)."""
    problems = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key in ("defaults", "name") and not prefix:  # name: check_name (without resolving it)
            continue
        if (not prefix and key in OPEN_SECTIONS) or path in OPEN_PATHS:
            continue
        if key not in base:
            problems.append((path, REMOVED_KEYS.get(path)
                             or f"unknown key; valid keys here: {', '.join(map(str, base.keys()))}"))
            continue
        value, default = cfg[key], base[key]
        if isinstance(default, DictConfig):
            if not isinstance(value, DictConfig):
                problems.append((path, f"must be a mapping, got {value!r}"))
            else:
                problems += check_keys(value, default, path + ".")
        elif path in NUMBER_KEYS and value is not None:
            if not _same_type(value, 0.0):
                problems.append((path, f"must be a number, got {value!r}"))
        elif default is not None and value is not None and not _same_type(value, default):
            problems.append((path, f"must be {_type_name(default)}, got {value!r}"))
    return problems


def _same_type(value, default) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, ListConfig)):
        return isinstance(value, (list, ListConfig))
    return isinstance(value, type(default))


def _type_name(v) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(type(v), "a list")


# -- values: meaning, not only type ---------------------------------------------------------
OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_values(cfg: DictConfig) -> list[tuple[str, str]]:
    """Values outside their meaningful range, every one at once (types are checked by :func:`check_keys`).

    A value of the wrong type is skipped here: check_keys reports it.
    """
    problems: list[tuple[str, str]] = []

    def get(key):
        try:
            return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception as exc:  # noqa: BLE001 - an interpolation that does not resolve
            problems.append((key, f"cannot be resolved: {exc}"))
            return None

    def at_least(key, low, integer=True):
        v = get(key)
        if v is None or not _num(v) or (integer and not isinstance(v, int)):
            return
        if not (math.isfinite(v) and v >= low):
            problems.append((key, f"must be {'an integer' if integer else 'a number'} ≥ {low}, got {v!r}"))

    for key in ("train.steps", "train.batch_size", "train.log_every", "eval.num_samples", "eval.batch_size"):
        at_least(key, 1)
    for key in ("train.ckpt_every", "train.warmup_steps", "eval.every", "resources.max_concurrent"):
        at_least(key, 0)
    for key in ("train.grad_clip", "train.weight_decay", "resources.cpus_per_trial", "resources.gpus_per_trial"):
        at_least(key, 0, integer=False)
    lr = get("train.lr")
    if _num(lr) and not (math.isfinite(lr) and lr > 0):
        problems.append(("train.lr", f"must be a finite number > 0, got {lr!r}"))
    ema = get("train.ema")
    if _num(ema) and not 0 <= ema < 1:
        problems.append(("train.ema", f"must be in [0, 1) (the EMA decay), got {ema!r}"))
    betas = get("train.betas")
    if isinstance(betas, (list, ListConfig)):
        b = list(betas)
        if len(b) != 2 or not all(_num(x) and 0 <= x < 1 for x in b):
            problems.append(("train.betas", f"must be two numbers in [0, 1) (Adam's β1, β2), got {b!r}"))
    opt = get("train.optimizer")
    if isinstance(opt, str) and opt not in OPTIMIZERS:
        problems.append(("train.optimizer", f"unknown optimizer {opt!r}; valid: {', '.join(OPTIMIZERS)}"))
    dev = get("train.device")
    if isinstance(dev, str) and not DEVICE_RE.fullmatch(dev):
        problems.append(("train.device", f"must be auto, cpu, cuda or cuda:N, got {dev!r}"))
    prec = get("train.precision")
    if isinstance(prec, str) and prec not in PRECISIONS:
        problems.append(("train.precision", f"must be one of {', '.join(PRECISIONS)}, got {prec!r}"))
    nfe = get("eval.nfe")
    if isinstance(nfe, (list, ListConfig)):
        bad = [x for x in nfe if not (isinstance(x, int) and not isinstance(x, bool) and x >= 1)]
        if bad:
            problems.append(("eval.nfe", f"every step budget must be an integer ≥ 1, got {list(nfe)!r}"))
    return problems


def validate(cfg: DictConfig, source: str) -> None:
    """Raise one :class:`ConfigError` with every out-of-range value of ``cfg`` (from ``source``)."""
    problems = check_values(cfg)
    if problems:
        raise ConfigError(source, problems)
