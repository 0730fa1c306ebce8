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
        problems = check_study_file(path)  # empty, not a mapping, hydra settings, defaults from outside its folder
        if problems:
            raise ConfigError(source, problems)
        study = _hydra_compose(path)
        problems = check_keys(study, base, resolve=False)  # interpolations: resolved and checked once merged
        if problems:
            raise ConfigError(source, problems)
        cfg = OmegaConf.merge(base, study)
        if _raw(cfg, "name") is None:  # never resolved here: check_name refuses interpolations
            cfg.name, named_by_file = path.stem, True
        problems = unresolvable(cfg)
        if problems:
            raise ConfigError(source, problems)
    else:  # a preset name
        cfg = base.copy()
        cfg.design = OmegaConf.create({"preset": target})
        cfg.name = target
        source = f"preset '{target}'"
    problems = apply_overrides(cfg, list(overrides), base)
    if problems:
        raise ConfigError(f"{source}, command line", problems)
    named_by_file = named_by_file and not any(str(o).lstrip("+").split("=", 1)[0] == "name" for o in overrides)
    problems = check_name(cfg, from_file_name=named_by_file)
    if problems:
        raise ConfigError(source, problems)
    problems = unresolvable(cfg)
    if problems:
        raise ConfigError(f"{source}, command line" if overrides else source, problems)
    return cfg, source


def check_study_file(path: Path) -> list[tuple[str, str]]:
    """What a study file must be before Hydra reads it: a non-empty mapping, no ``hydra:`` settings (its search path
    would load files from anywhere), and a ``defaults`` list that stays inside the study file's folder."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(errors="replace"))
    except yaml.YAMLError:
        return []  # Hydra's own message names the line
    if raw is None or raw == {}:
        return [("", "the study file is empty: it would run the default study (base.yaml: the meanflow preset on "
                     "digits, 2000 steps). Write at least its design or search, e.g. studies/toy_grid.yaml")]
    if not isinstance(raw, dict):
        return [("", f"must be a mapping of sections (data, design, train, eval, search, resources, tracking), "
                     f"got {type(raw).__name__}")]
    problems = []
    if "hydra" in raw:
        problems.append(("hydra", "Hydra's own settings are not allowed in a study file (hydra.searchpath would "
                                  "merge files from outside the study's folder)"))
    return problems + _defaults_outside(path)


#: prefixes of a defaults entry that do not name a file
_DEFAULT_WORDS = ("override ", "optional ")


def _defaults_outside(path: Path) -> list[tuple[str, str]]:
    """Entries of ``defaults`` lists (this file's and those of the files it pulls in) that name a file outside
    the folder of the study file (``../x@_global_``, an absolute path, a symbolic link leading out)."""
    import os

    import yaml

    root = path.parent.resolve()
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()

    def refs(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, dict):
            out = []
            for group, option in entry.items():
                options = option if isinstance(option, list) else [option]
                out += [f"{group}/{o}" for o in options if isinstance(o, str) and o not in ("???", "_self_")]
            return out
        return []

    def walk(file: Path, group: str) -> None:
        if file in seen:
            return
        seen.add(file)
        try:
            raw = yaml.safe_load(file.read_text(errors="replace"))
        except (OSError, yaml.YAMLError):
            return  # Hydra reports it
        entries = raw.get("defaults") if isinstance(raw, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            for ref in refs(entry):
                name = ref
                for word in _DEFAULT_WORDS:
                    name = name[len(word):] if name.startswith(word) else name
                name = name.split("@", 1)[0].strip()
                if not name or name == "_self_" or name.split("/")[0] == "hydra":
                    continue  # _self_, and Hydra's own packaged configs (hydra/...)
                rel = os.path.normpath(name.lstrip("/") if name.startswith("/") else os.path.join(group, name))
                target = Path(os.path.normpath(root / (rel if rel.endswith((".yaml", ".yml")) else rel + ".yaml")))
                inside = not rel.startswith("..") and not os.path.isabs(rel)
                try:
                    inside = inside and target.resolve().is_relative_to(root)
                except OSError:
                    inside = False
                if not inside:
                    problems.append(("defaults", f"entry {ref!r} names {target}, outside the study file's folder "
                                                 f"{root}: a study builds only on files in its own folder"))
                elif target.is_file():
                    walk(target.resolve(), os.path.dirname(rel))

    walk(path.resolve(), "")
    return problems


def unresolvable(cfg: DictConfig) -> list[tuple[str, str]]:
    """Every value whose interpolation does not resolve (an unregistered resolver, a missing variable or key),
    with the key and why (``name`` is checked by :func:`check_name`, without resolving it)."""
    problems: list[tuple[str, str]] = []

    def walk(node, prefix: str) -> None:
        keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
        for k in keys:
            path = f"{prefix}{k}" if isinstance(node, DictConfig) else f"{prefix.rstrip('.')}[{k}]"
            if path == "name":
                continue
            try:
                value = node[k]
            except Exception as exc:  # noqa: BLE001 - every resolution error, named with its key
                problems.append((path, f"cannot be resolved: {_why(exc)}"))
                continue
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value, path + ".")

    walk(cfg, "")
    return problems


def _why(exc: Exception) -> str:
    """Why an interpolation does not resolve, in one line (never empty; an unknown resolver lists the known ones)."""
    from omegaconf.basecontainer import BaseContainer
    from omegaconf.errors import UnsupportedInterpolationType

    msg = (str(exc).strip().splitlines() or [""])[0].strip()
    if isinstance(exc, UnsupportedInterpolationType):
        known = ", ".join(sorted(getattr(BaseContainer, "_resolvers", {}) or {})) or "none"
        return f"{msg or type(exc).__name__}: no such resolver is registered (registered: {known})"
    return msg or type(exc).__name__


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
        if open_path in SEARCH_TABLES and key != open_path:  # search.grid.design.target=[...]: a dotted entry
            problems += _set_search_entry(cfg, open_path, key[len(open_path) + 1:], _plain(value))
            continue
        if open_path and key != open_path and isinstance(OmegaConf.select(cfg, open_path), str):
            OmegaConf.update(cfg, open_path, {"name": OmegaConf.select(cfg, open_path)}, merge=False)
        OmegaConf.update(cfg, key, _plain(value), merge=True, force_add=True)
    problems += check_keys(cfg, base)
    return problems


#: tables keyed by dotted keys (``design.target: [...]``): a command-line key below them names one entry
SEARCH_TABLES = ("search.grid", "search.space")
SPACE_SPEC_KEYS = ("choices", "low", "high", "log", "int", "when")


def _set_search_entry(cfg: DictConfig, table: str, entry: str, value: Any) -> list[tuple[str, str]]:
    """``search.grid.<key>=value`` / ``search.space.<key>[.<spec key>]=value``: the rest of the key is one entry
    of the table (its keys hold dots), not a path of nested mappings."""
    node = OmegaConf.select(cfg, table)
    if not isinstance(node, DictConfig):
        OmegaConf.update(cfg, table, {}, merge=False, force_add=True)
        node = OmegaConf.select(cfg, table)
    if table == "search.space" and entry not in node:
        have = next((e for e in node.keys() if entry.startswith(f"{e}.")), None)
        if have is not None and entry[len(have) + 1:] in SPACE_SPEC_KEYS:  # search.space.train.lr.high=0.1
            spec = node[have]
            if not isinstance(spec, DictConfig):
                return [(f"{table}.{entry}", f"{table}.{have} is not a mapping ({{choices: [...]}} or {{low, high}})")]
            spec[entry[len(have) + 1:]] = value
            return []
        head, _, last = entry.rpartition(".")
        if head and last in SPACE_SPEC_KEYS:  # a new entry, one spec key at a time
            node[head] = {last: value}
            return []
    node[entry] = value
    return []


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


def check_keys(cfg: DictConfig, base: DictConfig, prefix: str = "", resolve: bool = True) -> list[tuple[str, str]]:
    """Unknown keys and wrong types in the closed sections (everything but data/design).

    ``resolve=False`` (a study file on its own, before it is merged over the base): interpolated values are not
    resolved (they may name base keys) and not type-checked here."""
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
        if not resolve and OmegaConf.is_interpolation(cfg, key):
            continue
        try:
            value = cfg[key]
        except Exception as exc:  # noqa: BLE001 - an interpolation that does not resolve: say which and why
            problems.append((path, f"cannot be resolved: {_why(exc)}"))
            continue
        default = base[key]
        if isinstance(default, DictConfig):
            if not isinstance(value, DictConfig):
                problems.append((path, f"must be a mapping, got {value!r}"))
            else:
                problems += check_keys(value, default, path + ".", resolve)
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
    for key in ("eval.nfe", "sample.nfe"):
        nfe = get(key)
        if isinstance(nfe, (list, ListConfig)):
            bad = [x for x in nfe if not (isinstance(x, int) and not isinstance(x, bool) and x >= 1)]
            if bad:
                problems.append((key, f"every step budget must be an integer ≥ 1, got {list(nfe)!r}"))
    for key in ("sample.num", "train.world_size"):
        at_least(key, 1)
    for key in ("eval.reference_samples", "search.max_failures", "search.grace_period", "search.sampler_seed"):
        at_least(key, 0)
    at_least("train.ckpt_every_s", 0, integer=False)
    cpb = get("train.classes_per_batch")
    if cpb is not None and not (isinstance(cpb, int) and not isinstance(cpb, bool) and cpb >= 0):
        problems.append(("train.classes_per_batch", f"must be null or an integer ≥ 0 (same-class groups per batch), "
                                                    f"got {cpb!r}"))
    rf = get("search.reduction_factor")
    if _num(rf) and not (math.isfinite(rf) and rf > 1):
        problems.append(("search.reduction_factor", f"must be a number > 1 (ASHA keeps 1/reduction_factor of the "
                                                    f"trials at each rung), got {rf!r}"))
    metrics = get("eval.metrics")
    if isinstance(metrics, (list, ListConfig)):
        bad = [m for m in metrics if m not in EVAL_METRICS]
        if bad or not list(metrics):
            problems.append(("eval.metrics", f"must be a non-empty list of {', '.join(EVAL_METRICS)}, "
                                             f"got {list(metrics)!r}"))
    fid_se = get("eval.fid_se")
    if isinstance(fid_se, str) and fid_se not in FID_SE:
        problems.append(("eval.fid_se", f"must be one of {', '.join(FID_SE)}, got {fid_se!r}"))
    reps = get("eval.fid_se_reps")
    if fid_se == "bootstrap" and _num(reps) and isinstance(reps, int) and reps < 2:
        problems.append(("eval.fid_se_reps", f"must be an integer ≥ 2 (bootstrap replicates), got {reps!r}"))
    problems += check_data_values(cfg)
    return problems


EVAL_METRICS = ("fid", "kid", "prc")  # ablate.evaluation.METRICS (not imported here: torch-fidelity is slow)
FID_SE = ("bootstrap", "none")
#: options of the built-in datasets, by name: (kind, bound, what it is). A dataset that has the option gets it
#: checked before it is loaded (``data.modes: 0`` would otherwise fail deep inside NumPy with "high <= 0").
DATA_RANGES = {
    "n": ("int", 1, "the number of points"),
    "modes": ("int", 1, "the number of Gaussians"),
    "squares": ("int", 1, "squares per side"),
    "size": ("int", 1, "the image size in pixels"),
    "radius": ("pos", 0, "the ring's radius"),
    "std": ("pos", 0, "each Gaussian's standard deviation"),
    "turns": ("pos", 0, "the spirals' turns"),
    "noise": ("nonneg", 0, "the noise's standard deviation"),
    "test_fraction": ("unit", 0, "the held-out share"),
}


def check_data_values(cfg: DictConfig) -> list[tuple[str, str]]:
    """Options of the dataset (``data.*``) outside their meaning, for the options :data:`DATA_RANGES` knows."""
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True) if isinstance(cfg.get("data"), DictConfig) else {}
    except Exception:  # noqa: BLE001 - reported by unresolvable()
        return []
    name, problems = data.get("name"), []
    for opt, value in data.items():
        rule = DATA_RANGES.get(opt)
        if rule is None or not _num(value):
            continue
        kind, low, what = rule
        where = f"data.{opt}"
        if kind == "int" and isinstance(value, int) and value < low:
            problems.append((where, f"must be an integer ≥ {low} ({what} of {name}), got {value!r}"))
        elif kind == "pos" and not (math.isfinite(value) and value > 0):
            problems.append((where, f"must be a finite number > 0 ({what} of {name}), got {value!r}"))
        elif kind == "nonneg" and not (math.isfinite(value) and value >= 0):
            problems.append((where, f"must be a finite number ≥ 0 ({what} of {name}), got {value!r}"))
        elif kind == "unit" and not 0 <= value < 1:
            problems.append((where, f"must be in [0, 1) ({what} of {name}), got {value!r}"))
    return problems


# -- what a study logs, and overrides a search would overwrite -------------------------------------
TRAIN_METRICS = ("train/loss", "train/mse", "train/steps_per_s", "time/train_s")


def logged_metrics(cfg: DictConfig) -> list[str]:
    """Every metric a trial of ``cfg`` logs (what an objective may name): the training curve, and per evaluated
    NFE the metrics of ``eval.metrics`` when evaluation is on (``eval.every`` > 0 or ``eval.at_end``)."""
    out = list(TRAIN_METRICS)
    ec = cfg.eval
    if not (int(ec.every or 0) or bool(ec.at_end)):
        return out
    names = {"fid": ["fid"] + (["fid_se"] if str(ec.fid_se) == "bootstrap" else []), "kid": ["kid"],
             "prc": ["precision", "recall"]}
    for nfe in list(ec.nfe):
        for m in list(ec.metrics):
            out += [f"{n}/nfe_{nfe}" for n in names.get(str(m), [])]
    return out + ["time/eval_s"]


_ABSENT = object()


def shadowed_overrides(cfg: DictConfig, overrides: list[str]) -> list[tuple[str, str]]:
    """Command-line overrides that the search would overwrite in every trial (``design.target=meanflw`` while
    ``search.grid.design.target`` searches the target): such an override would be silently ignored, typo and all."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - reported by compose()
        return []
    tables = []
    for table in SEARCH_TABLES:
        node = OmegaConf.select(cfg, table)
        if isinstance(node, DictConfig):
            entries = OmegaConf.to_container(node, resolve=False)
            for key, spec in entries.items():
                values = spec if table == "search.grid" and isinstance(spec, list) else (
                    spec.get("choices") if isinstance(spec, dict) else None)
                tables.append((table, str(key), values if isinstance(values, list) else [None]))
    problems = []
    for ov in parsed:
        key = ov.key_or_group.lstrip("+")
        if key.split(".")[0] == "search" or ov.is_delete():
            continue
        value = _plain(ov.value())
        for table, entry, values in tables:
            if _shadows(entry, values, key, value):
                shown = ov.input_line or f"{key}={value}"
                problems.append((key, f"{shown} on the command line is overwritten in every trial by {table}.{entry} "
                                      f"({values if values != [None] else 'searched'}), so it would be ignored; "
                                      f"change the search instead, e.g. '{table}.{entry}=[...]', or drop the override"))
                break
    return problems


def _shadows(entry: str, values: list, key: str, value) -> bool:
    if key == entry:
        return True
    if key.startswith(entry + "."):  # a sub-key of a searched key: a searched name replaces the whole component
        sub = key[len(entry) + 1:]
        return any(not isinstance(v, dict) or OmegaConf.select(OmegaConf.create(v), sub, default=_ABSENT)
                   is not _ABSENT for v in values)
    if entry.startswith(key + ".") and isinstance(value, dict):  # design={target: ...} while design.target is searched
        return OmegaConf.select(OmegaConf.create(value), entry[len(key) + 1:], default=_ABSENT) is not _ABSENT
    return False


def validate(cfg: DictConfig, source: str) -> None:
    """Raise one :class:`ConfigError` with every out-of-range value of ``cfg`` (from ``source``)."""
    problems = check_values(cfg)
    if problems:
        raise ConfigError(source, problems)
