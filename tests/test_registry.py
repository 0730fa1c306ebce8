"""The registry contract: names, options, types, defaults, entry points, listing (DESIGN §3)."""
from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ablate.data  # noqa: F401  (registers the datasets)
import components  # noqa: F401  (registers the built-ins)
from components.registry import REGISTRIES, TARGET, TIME_SAMPLER, Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]


# -- names -------------------------------------------------------------------
def test_unknown_name_suggests_closest_and_lists_choices():
    with pytest.raises(RegistryError) as exc:
        TARGET.get("meanflw")
    msg = str(exc.value)
    assert "unknown target 'meanflw'" in msg
    assert "Did you mean 'meanflow'?" in msg
    for name in TARGET.names():
        assert name in msg


def test_unknown_name_without_close_match_still_lists_choices():
    with pytest.raises(RegistryError) as exc:
        TIME_SAMPLER.build("zzzzzz")
    msg = str(exc.value)
    assert "Did you mean" not in msg
    assert all(n in msg for n in TIME_SAMPLER.names())


def test_non_string_name_is_a_registry_error():
    with pytest.raises(RegistryError):
        TARGET.get(3)  # type: ignore[arg-type]


def test_duplicate_registration_is_refused():
    reg = Registry("thing")

    @reg.register("a")
    def a():
        """First."""

    reg.register("a")(a)  # the same factory again is harmless
    with pytest.raises(RegistryError, match="already registered"):
        @reg.register("a")
        def other():
            pass


# -- options -------------------------------------------------------------------
def test_unknown_kwarg_names_it_and_lists_accepted_options():
    with pytest.raises(RegistryError) as exc:
        TARGET.resolve("meanflow", {"jvpp": "exact"})
    msg = str(exc.value)
    assert "'jvpp'" in msg
    assert "Did you mean 'jvp'?" in msg
    for opt in TARGET.options("meanflow"):
        assert opt in msg


@pytest.mark.parametrize("kind,name,kwargs,fragment", [
    ("time_sampler", "logit_normal", {"std": "a"}, "must be a number"),
    ("time_sampler", "dyadic", {"base_steps": 1.5}, "must be an integer"),
    ("time_sampler", "dyadic", {"base_steps": True}, "must be an integer"),
    ("time_sampler", "logit_normal", {"mean": False}, "must be a number"),
    ("time_sampler", "uniform", {"r_zero_warmup": "10"}, "must be a number"),  # steps, or a fraction of the run
    ("target", "shortcut", {"clip": "big"}, "clip"),  # Optional[float]
    ("backbone", "dit", {"depth": 1.5}, "depth"),  # Optional[int]
])
def test_wrong_type_is_refused(kind, name, kwargs, fragment):
    with pytest.raises(RegistryError) as exc:
        REGISTRIES[kind].resolve(name, kwargs)
    msg = str(exc.value)
    assert fragment in msg
    assert f"{kind} '{name}'" in msg


def test_literal_option_lists_its_choices():
    with pytest.raises(RegistryError) as exc:
        TARGET.resolve("meanflow", {"jvp": "exactly"})
    msg = str(exc.value)
    assert "'exact'" in msg and "'finite_difference'" in msg and "'exactly'" in msg


def test_none_values_are_dropped_so_defaults_apply():
    resolved = TIME_SAMPLER.resolve("logit_normal", {"std": None, "mean": 0.5})
    assert resolved["std"] == 1.0
    assert resolved["mean"] == 0.5


def test_ints_pass_as_floats():
    resolved = TIME_SAMPLER.resolve("logit_normal", {"std": 2})
    assert resolved["std"] == 2.0 and isinstance(resolved["std"], float)


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_resolve_fills_every_default(kind):
    reg = REGISTRIES[kind]
    for name in reg.names():
        opts = reg.options(name)
        required = [k for k, p in opts.items() if p.default is inspect.Parameter.empty]
        if required:
            continue
        resolved = reg.resolve(name, {})
        assert list(resolved) == list(opts)
        assert resolved == {k: p.default for k, p in opts.items()}
        assert not set(reg.facts) & set(resolved), "facts must never be user options"


def test_facts_are_hidden_and_supplied_by_build():
    reg = Registry("widget", facts=("data_shape",))

    @reg.register("w")
    def make(a: int, b: float = 1.0, *, data_shape=None):
        """A widget."""
        return (a, b, data_shape)

    assert list(reg.options("w")) == ["a", "b"]
    with pytest.raises(RegistryError, match="needs option 'a'"):
        reg.resolve("w", {})
    with pytest.raises(RegistryError, match="no option 'data_shape'"):
        reg.resolve("w", {"a": 1, "data_shape": (2,)})
    assert reg.build("w", {"a": 3}, data_shape=(2,), unrelated=1) == (3, 1.0, (2,))
    assert reg.get("w").description == "A widget."


# -- entry points ----------------------------------------------------------------
def _fake_distribution(root: Path, dist: str, group: str, line: str, module_src: str | None, mod: str) -> None:
    if module_src is not None:
        (root / f"{mod}.py").write_text(textwrap.dedent(module_src))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{line}\n")


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    importlib.invalidate_caches()


def test_entry_point_plugin_is_discovered_and_built(plugin_path):
    _fake_distribution(plugin_path, "fakeplugin", "ablate.schedule", "my_sched = fakeplugin_mod:MySchedule", """
        import torch

        from components.schedules import Schedule


        class MySchedule(Schedule):
            \"\"\"A plugin schedule: alpha = 1 - t**2.\"\"\"

            def __init__(self, power: float = 2.0):
                self.power = power

            def alpha(self, t):
                return 1 - t ** self.power

            def sigma(self, t):
                return t
        """, "fakeplugin_mod")
    importlib.invalidate_caches()
    reg = Registry("schedule")  # fresh: the global SCHEDULE stays untouched
    reg.discover()
    assert "my_sched" in reg.names()
    entry = reg.get("my_sched")
    assert "entry point" in entry.source and "fakeplugin_mod:MySchedule" in entry.source
    assert entry.description.startswith("A plugin schedule")
    assert reg.resolve("my_sched", {}) == {"power": 2.0}
    obj = reg.build("my_sched", {"power": 3})
    assert type(obj).__name__ == "MySchedule" and obj.power == 3.0
    with pytest.raises(RegistryError, match="Did you mean 'my_sched'"):
        reg.get("my_schd")


def test_broken_entry_point_fails_with_a_clear_message(plugin_path):
    _fake_distribution(plugin_path, "brokenplugin", "ablate.weighting", "broken = no_such_module_xyz:Thing",
                       None, "unused")
    importlib.invalidate_caches()
    reg = Registry("weighting")
    with pytest.raises(RegistryError) as exc:
        reg.discover()
    assert "weighting 'broken'" in str(exc.value) and "no_such_module_xyz:Thing" in str(exc.value)


# -- python -m ablate.list ------------------------------------------------------
LIST_ARGS = {"all": [], "target": ["target"], "nonsense": ["nonsense"]}


@pytest.fixture(scope="module")
def list_runs():
    """Run the three listings concurrently (each spends seconds importing torch)."""
    procs = {k: subprocess.Popen([sys.executable, "-m", "ablate.list", *a], cwd=ROOT, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, a in LIST_ARGS.items()}
    out = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[k] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def _option_lines(reg: Registry, name: str):
    for key, p in reg.options(name).items():
        default = "(required)" if p.default is inspect.Parameter.empty else repr(p.default)
        yield key, default


def test_list_shows_every_plugin_option_and_default(list_runs):
    list_all = list_runs["all"]
    assert list_all.returncode == 0, list_all.stderr
    out = list_all.stdout
    lines = out.splitlines()
    for kind, reg in REGISTRIES.items():
        assert any(ln == kind for ln in lines), f"no section for {kind}"
        for name in reg.names():
            assert any(ln.startswith(f"  {name}") for ln in lines), f"{kind} {name} not listed"
            for key, default in _option_lines(reg, name):
                assert any(ln.strip().startswith(f"{key}:") and ln.rstrip().endswith(f"= {default}")
                           for ln in lines), f"{kind} {name}: option {key} = {default} not listed"
    from ablate.design import PRESETS

    for preset in PRESETS:
        assert f"  {preset} —" in out


def test_list_one_kind(list_runs):
    res = list_runs["target"]
    assert res.returncode == 0, res.stderr
    for name in TARGET.names():
        assert f"  {name}" in res.stdout
        for key, default in _option_lines(TARGET, name):
            assert f"{key}: " in res.stdout and f"= {default}" in res.stdout
    assert "checkerboard" not in res.stdout and "logit_normal" not in res.stdout


def test_list_unknown_kind_exits_2(list_runs):
    res = list_runs["nonsense"]
    assert res.returncode == 2
    assert "nonsense" in res.stderr and "target" in res.stderr
    assert "Traceback" not in res.stderr
