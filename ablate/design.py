"""Designs: one (name, kwargs) per component kind; presets are named designs.

    spec = {"preset": "meanflow", "schedule": "cosine", "target": {"jvp": "finite_difference"}}
    design = resolve_design(spec)          # validated, defaults filled in
    design.design_id, design.slug          # 'a1b2c3d4e5f6', 'cosine-logit_normal-meanflow-...'
    comps = build_components(design, data) # the objects, compatibility-checked

Override rules: a kind given as a string or with a different ``name`` replaces
the preset's choice (its kwargs start from the new plugin's defaults); a kind
given without a name, or with the same name, merges its kwargs into the
preset's.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import components  # noqa: F401  (registers the built-ins)
from components.compose import Components
from components.registry import DESIGN_KINDS, REGISTRIES, RegistryError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {}


def register_preset(name: str, design: dict[str, dict[str, Any]], paper: str = "",
                    train: dict[str, Any] | None = None) -> None:
    """A named design. ``train``: training settings the method's paper uses that are not components
    (e.g. ESC's class-consistent batches, ``classes_per_batch``); they apply where the run leaves the
    setting unset (null)."""
    PRESETS[name] = {"_paper": paper, "_train": dict(train or {}), **copy.deepcopy(design)}


def preset_train_setting(preset: str | None, key: str, default: Any = None) -> Any:
    """The preset's recommended ``train.<key>``, or ``default``."""
    return PRESETS.get(preset or "", {}).get("_train", {}).get(key, default)


class DesignError(ValueError):
    """One or more problems with a design; ``problems`` lists (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{k}: {m}" for k, m in problems))


@dataclass(frozen=True)
class Design:
    components: dict  # kind -> {"name": str, "kwargs": dict}, fully resolved
    preset: str | None = None

    def canonical(self) -> dict:
        return {k: {"name": self.components[k]["name"], "kwargs": _jsonable(self.components[k]["kwargs"])}
                for k in DESIGN_KINDS}

    @property
    def design_id(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def slug(self) -> str:
        return "-".join(REGISTRIES[k].slug(self.components[k]["name"], self.components[k]["kwargs"])
                        for k in DESIGN_KINDS)

    def name(self, kind: str) -> str:
        return self.components[kind]["name"]

    def kwargs(self, kind: str) -> dict:
        return dict(self.components[kind]["kwargs"])

    def flat_params(self) -> dict[str, Any]:
        """``design.<kind>.name`` and ``design.<kind>.<kwarg>`` (for trackers and tables)."""
        out = {}
        for k in DESIGN_KINDS:
            out[f"design.{k}.name"] = self.components[k]["name"]
            for key, v in self.components[k]["kwargs"].items():
                out[f"design.{k}.{key}"] = v
        return out

    def to_json(self) -> str:
        return json.dumps({"design_id": self.design_id, "slug": self.slug, "preset": self.preset,
                           "components": self.canonical()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Design":
        d = json.loads(text)
        return cls(d["components"], d.get("preset"))


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _as_choice(value: Any) -> dict:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"must be a plugin name or a mapping with 'name' and options, got {value!r}")


def resolve_design(spec: Mapping | str, default_backbone: dict | None = None, where: str = "design") -> Design:
    """Validate a design spec and fill in every default. Reports every problem at once."""
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec or {})
    problems: list[tuple[str, str]] = []
    preset = spec.pop("preset", None)
    base: dict[str, dict] = {}
    if preset is not None:
        if preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(str(preset), PRESETS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append((f"{where}.preset", f"unknown preset '{preset}'.{hint} Valid choices: {', '.join(sorted(PRESETS))}"))
        else:
            base = {k: copy.deepcopy(v) for k, v in PRESETS[preset].items() if not k.startswith("_")}
    for key in spec:
        if key not in DESIGN_KINDS:
            problems.append((f"{where}.{key}", f"unknown design key; valid keys: preset, {', '.join(DESIGN_KINDS)}"))
    if "backbone" not in base and default_backbone is not None:
        base["backbone"] = copy.deepcopy(default_backbone)
    resolved: dict[str, dict] = {}
    for kind in DESIGN_KINDS:
        try:
            choice = _merge(base.get(kind), spec.get(kind))
        except TypeError as exc:
            problems.append((f"{where}.{kind}", str(exc)))
            continue
        if choice is None or "name" not in choice:
            if preset is not None and preset not in PRESETS:
                continue  # the unknown preset is the problem; don't repeat it per kind
            problems.append((f"{where}.{kind}", f"no {kind} chosen: name a preset or set {where}.{kind}.name "
                                                f"(one of {', '.join(REGISTRIES[kind].names())})"))
            continue
        name = choice.pop("name")
        try:
            resolved[kind] = {"name": name, "kwargs": REGISTRIES[kind].resolve(name, choice)}
        except RegistryError as exc:
            problems.append((f"{where}.{kind}", str(exc)))
    if problems:
        raise DesignError(problems)
    return Design(resolved, preset)


def _merge(base: dict | None, override: Any) -> dict | None:
    if override is None:
        return copy.deepcopy(base)
    over = _as_choice(override)
    if base is None or ("name" in over and over["name"] != base.get("name")):
        return over
    return {**base, **over}


def init_seed(seed: int, design: Design, kind: str, data_shape: tuple, num_classes: int) -> int:
    """The RNG seed a component of ``kind`` is built under: a hash of (seed, its name and options, the data's
    shape and class count) only, so the same backbone starts from the same weights in every design."""
    blob = json.dumps([int(seed), kind, design.name(kind), _jsonable(design.kwargs(kind)), list(data_shape),
                       int(num_classes)], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "little") >> 1


def build_components(design: Design, data_shape: tuple, num_classes: int,
                     train_steps: int | None = None, seed: int | None = None) -> Components:
    """Instantiate every component; raise DesignError if the combination cannot work.

    ``train_steps`` (the run's length) is a fact for options given as a fraction of the run.
    ``seed``: build each component under its own :func:`init_seed` (the global CPU RNG is restored
    afterwards), so e.g. a weighting with parameters built first does not shift the backbone's
    initial weights; None: whatever the global RNG holds, in build order.
    """
    import torch

    from components.registry import BACKBONE, GUIDANCE, SCHEDULE, TARGET, TIME_SAMPLER, WEIGHTING

    def seeded(kind, build, **facts):
        if seed is None:
            return build(design.name(kind), design.kwargs(kind), **facts)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(init_seed(seed, design, kind, data_shape, num_classes))
            return build(design.name(kind), design.kwargs(kind), **facts)

    problems = []
    try:
        schedule = seeded("schedule", SCHEDULE.build)
        built = dict(
            schedule=schedule,
            time_sampler=seeded("time_sampler", TIME_SAMPLER.build, schedule=schedule, train_steps=train_steps),
            target=seeded("target", TARGET.build, train_steps=train_steps),
            weighting=seeded("weighting", WEIGHTING.build, data_shape=data_shape, schedule=schedule),
            backbone=seeded("backbone", BACKBONE.build, data_shape=data_shape, num_classes=num_classes),
            guidance=seeded("guidance", GUIDANCE.build),
        )
    except (ValueError, TypeError) as exc:
        raise DesignError([("design", f"cannot build {design.slug}: {exc}")]) from exc
    for kind, obj in built.items():
        check = getattr(obj, "compatible", None)
        if callable(check):
            problems += [(f"design.{kind}", msg) for msg in check(built)]
    if problems:
        raise DesignError(problems)
    return Components(**built)


# -- presets (DESIGN §3 "Methods are presets, not code paths") -------------------
register_preset("flow_matching", {
    "schedule": {"name": "linear"},
    "time_sampler": {"name": "logit_normal", "mean": 0.0, "std": 1.0, "fraction_r_neq_t": 0.0,
                     "r_eq_t_time": "single"},  # SD3-style flow matching: one draw of t
    "target": {"name": "flow_matching"},
    "weighting": {"name": "l2"},
    "guidance": {"name": "cfg"},
}, paper="Lipman et al. 2023; Liu et al. 2023 (rectified flow); logit-normal t from Esser et al. 2024")

register_preset("scd", {
    "schedule": {"name": "linear"},
    "time_sampler": {"name": "dyadic", "base_steps": 128},
    # bootstrap CFG 1.5 on the smallest bootstrap step: the released ImageNet command (--model.bootstrap_cfg 1
    # --model.cfg_scale 1.5); midpoint clip, guided rows and real labels on bootstrap rows are the target's defaults
    "target": {"name": "shortcut", "base_steps": 128, "teacher": "ema"},  # bootstrap CFG = sampling scale (1)
    "weighting": {"name": "l2"},
    "guidance": {"name": "cfg"},
}, paper="Frans, Hafner, Levine, Abbeel, One Step Diffusion via Shortcut Models, ICLR 2025")

register_preset("meanflow", {
    "schedule": {"name": "linear"},
    "time_sampler": {"name": "logit_normal", "mean": -0.4, "std": 1.0, "fraction_r_neq_t": 0.25},
    "target": {"name": "meanflow", "jvp": "exact"},
    "weighting": {"name": "adaptive", "p": 1.0},
    "guidance": {"name": "meanflow_cfg"},
}, paper="Geng et al., Mean Flows for One-step Generative Modeling, 2025")

# The rest of the unified design space (ESC, Lin, Hu et al. 2026, Table 1), each a composition of plugins.
for _name, _path in (("ct", "cosine"), ("ct_linear", "linear")):
    register_preset(_name, {
        "schedule": {"name": _path},
        "time_sampler": {"name": "discrete", "steps": 64, "grid": "karras", "index": "lognormal"},
        "target": {"name": "consistency", "mode": "discrete", "space": "data", "teacher": "online"},
        "weighting": {"name": "pseudo_huber"},
        "guidance": {"name": "cfg"},
    }, paper="Song et al., Consistency Models, ICML 2023; improved CT (online teacher, pseudo-Huber, "
             "log-normal index), Song & Dhariwal, ICLR 2024")

for _name, _path in (("sct", "cosine"), ("sct_linear", "linear")):
    register_preset(_name, {
        "schedule": {"name": _path},
        "time_sampler": {"name": "lognormal_sigma", "p_mean": -1.0, "p_std": 1.4, "r_mode": "zero"},
        # ESC's scm_cos_loss.py normalises the tangent (c = 0.1, per-entry RMS), scm_linear_loss.py does not;
        # both warm up over 10k steps of their 1.2M-step run (as a fraction of ours)
        "target": {"name": "consistency", "mode": "continuous", "jvp": "exact",
                   "tangent_norm": 0.1 if _path == "cosine" else 0.0, "tangent_warmup": 10_000 / 1_200_000},
        "weighting": {"name": "l2"},
        "guidance": {"name": "cfg"},
    }, paper="Lu & Song, Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models, ICLR 2025")

register_preset("imm", {
    "schedule": {"name": "linear"},
    "time_sampler": {"name": "imm", "group_size": 4},
    "target": {"name": "imm", "k": 12, "mapping": "eta", "teacher": "online"},
    "weighting": {"name": "mmd", "kernel": "laplace", "time_weight": "imm"},
    "guidance": {"name": "cfg"},
}, paper="Zhou, Ermon, Song, Inductive Moment Matching, ICML 2025")

register_preset("esc", {
    "schedule": {"name": "linear"},
    "time_sampler": {"name": "logit_normal", "mean": -0.4, "std": 1.0, "fraction_r_neq_t": 0.25,
                     "r_zero_warmup": 20000 / 1_200_000},  # ESC's 20k of a 1.2M-step run, as a fraction
    "target": {"name": "meanflow", "jvp": "exact", "velocity": "plugin", "plugin_prob": 0.5},
    "weighting": {"name": "learned_logvar", "base": "adaptive", "p": 1.0},
    "guidance": {"name": "meanflow_cfg", "omega": 1.0, "kappa": 0.5},
}, paper="Lin, Hu et al., On the Design of One-step Diffusion via Shortcutting Flow Paths, ICLR 2026",
   train={"classes_per_batch": 8})  # the reference: a same-class batch per GPU, on 8 GPUs

# The 2026 design space: the same loop, new targets (and guidance as a network input).
register_preset("imf", {
    "schedule": {"name": "linear"},
    # the released code (imf.py): t, r ~ logit-normal(−0.4, 1), sorted; half the rows flow matching
    "time_sampler": {"name": "logit_normal", "mean": -0.4, "std": 1.0, "fraction_r_neq_t": 0.5},
    "target": {"name": "imf", "velocity_head": "aux", "tangent": "predicted"},
    "weighting": {"name": "adaptive", "p": 1.0, "c": 0.01},  # norm_p = 1, norm_eps = 0.01
    # ω ∝ 1/ω on [1, 8] (cfg_beta 1, s_max 7), t_min ~ U(0, ½), t_max ~ U(½, 1); sampled at ω = 7.5 on
    # [0.4, 0.65] (train_config.yml's evaluation); any other scale is a sampling choice
    "guidance": {"name": "cfg_input", "label_dropout": 0.1, "scale": 7.5, "t_min": 0.4, "t_max": 0.65,
                 "scale_min": 1.0, "scale_max": 8.0, "power": 1.0, "interval": "uniform",
                 "unconditional_scale": "drawn"},
}, paper="Geng, Lu, Wu, Shechtman, Kolter, He, Improved Mean Flows: On the Challenges of Fastforward "
         "Generative Models, arXiv 2512.02012, 2025")

register_preset("alphaflow", {
    "schedule": {"name": "linear"},
    "time_sampler": {"name": "logit_normal", "mean": -0.4, "std": 1.0, "fraction_r_neq_t": 0.75},  # ratio_fm 0.25
    # alphaflow-sigmoid-latentspace-B-2-cfg-training: α 1 → 0 by a sigmoid (γ = 25) over the whole run
    # (0 → 1.2M of 1.2M steps, as fractions), clamped to 0 below 0.005 (then MeanFlow's JVP target)
    "target": {"name": "alphaflow", "anneal": "sigmoid", "anneal_from": 0.0, "anneal_to": 1.0, "gamma": 25.0,
               "clamp": 0.005},
    "weighting": {"name": "adaptive", "p": 1.0},
    "guidance": {"name": "meanflow_cfg", "omega": 1.0, "kappa": 0.5},
}, paper="Zhang, Siarohin, Menapace, Vasilkovsky, Tulyakov, Qu, Skorokhodov, AlphaFlow: Understanding and "
         "Improving MeanFlow Models, arXiv 2510.20771, 2025")

register_preset("tvm", {
    "schedule": {"name": "linear"},
    # terminal rows: t, r from two logit-normal(−0.4, 1) draws; flow-matching rows: one draw (the code's s')
    "time_sampler": {"name": "logit_normal", "mean": -0.4, "std": 1.0, "fraction_r_neq_t": 0.5,
                     "r_eq_t_time": "single"},
    "target": {"name": "tvm", "jvp_grad": True, "teacher": "ema", "ema": 0.99},  # ema_target_beta 0.99
    "weighting": {"name": "l2"},
    # configs/im256_w2.yaml: ω = 2 fed to the network (learn_guidance), u = ω·F_θ (do_scale_param)
    "guidance": {"name": "cfg_input", "label_dropout": 0.1, "scale": 2.0, "scale_min": 2.0, "scale_max": 2.0,
                 "unconditional_scale": "one", "scale_output": True},
}, paper="Zhou, Parger, Haque, Song, Terminal Velocity Matching, arXiv 2511.19797, 2025")

register_preset("split_meanflow", {
    "schedule": {"name": "linear"},
    "time_sampler": {"name": "uniform", "fraction_r_neq_t": 0.5},
    "target": {"name": "split_meanflow", "split": "uniform", "teacher": "online"},
    "weighting": {"name": "l2"},
    "guidance": {"name": "cfg"},
}, paper="Guo, Wang, Yuan et al., SplitMeanFlow: Interval Splitting Consistency in Few-Step Generative "
         "Modeling, arXiv 2507.16884, 2025")
