"""Study/run configuration: Hydra composition, command-line overrides, validation.

A study file may start from a base file through Hydra's ``defaults`` list;
the result is merged over ``ablate/conf/base.yaml``, then ``key=value``
overrides (Hydra's override grammar) are applied. Validation walks the closed
sections and reports every problem at once, with the file and key path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

BASE = Path(__file__).parent / "conf" / "base.yaml"
OPEN_SECTIONS = {"data", "design"}  # plugin options: checked by the registries instead
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
    source = "<defaults>"
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
        if cfg.name is None:
            cfg.name = path.stem
    else:  # a preset name
        cfg = base.copy()
        cfg.design = OmegaConf.create({"preset": target})
        cfg.name = target
        source = f"preset '{target}'"
    problems = apply_overrides(cfg, list(overrides), base)
    if problems:
        raise ConfigError("command line", problems)
    return cfg, source


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
        if key == "defaults" and not prefix:
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
