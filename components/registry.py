"""One registry class, one instance per component kind.

The registry is the contract between the math (``components/``) and the
orchestration (``ablate/``): a plugin is a factory (class or function) whose
keyword signature *is* its option list. Defaults live only there.

    @SCHEDULE.register("linear")
    class Linear(Schedule): ...

    SCHEDULE.build("linear")                     # -> Linear()
    SCHEDULE.resolve("cosine", {})               # -> {} defaults filled in
    TARGET.resolve("meanflow", {"jvp": "exact"}) # validated, defaults filled

Third-party packages add plugins through the entry-point group
``ablate.<kind>`` (e.g. ``ablate.target``): the entry point's value is a
factory, registered under the entry point's name. Names in study files are
only ever looked up here; nothing is imported from a dotted path.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Literal, Union, get_args, get_origin


class RegistryError(ValueError):
    """A name, option or value that a registry cannot accept."""


@dataclass
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    source: str = "builtin"
    slug: Callable[[dict], str] | None = None


@dataclass
class Registry:
    """Named factories of one component kind.

    ``facts`` are keyword parameters the platform supplies from the data or
    from other components (e.g. ``data_shape`` for a backbone); users can
    neither see nor set them.
    """

    kind: str
    facts: tuple[str, ...] = ()
    _entries: dict[str, Entry] = field(default_factory=dict)
    _discovered: bool = False

    # -- registration -----------------------------------------------------
    def register(self, name: str, *, slug: Callable[[dict], str] | None = None, source: str = "builtin"):
        def decorator(factory):
            self.add(name, factory, slug=slug, source=source)
            return factory

        return decorator

    def add(self, name: str, factory: Callable, *, slug=None, source: str = "builtin") -> None:
        if name in self._entries and self._entries[name].factory is not factory:
            raise RegistryError(f"{self.kind} '{name}' is already registered by {self._entries[name].source}")
        doc = inspect.getdoc(factory) or ""
        self._entries[name] = Entry(name, factory, doc.split("\n\n")[0].replace("\n", " "), source, slug)

    def discover(self) -> None:
        """Load third-party plugins from the ``ablate.<kind>`` entry-point group (once)."""
        if self._discovered:
            return
        self._discovered = True
        for ep in metadata.entry_points(group=f"ablate.{self.kind}"):
            if ep.name in self._entries:
                continue
            try:
                factory = ep.load()
            except Exception as exc:  # a broken plugin must not break the platform
                raise RegistryError(f"plugin {self.kind} '{ep.name}' ({ep.value}) failed to load: {exc}") from exc
            self.add(ep.name, factory, source=f"entry point {ep.value}")

    # -- lookup -------------------------------------------------------------
    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._entries

    def get(self, name: str) -> Entry:
        self.discover()
        if not isinstance(name, str) or name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} '{name}'.{hint} Valid choices: {', '.join(self.names())}"
            )
        return self._entries[name]

    def options(self, name: str) -> dict[str, inspect.Parameter]:
        """The user-settable keyword options of a plugin, in signature order."""
        sig = inspect.signature(self.get(name).factory)
        return {
            p.name: p
            for p in sig.parameters.values()
            if p.name not in self.facts and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }

    # -- validation ---------------------------------------------------------
    def resolve(self, name: str, kwargs: dict | None = None) -> dict[str, Any]:
        """Validate ``kwargs`` for plugin ``name`` and return them with defaults filled in.

        ``None`` values are dropped so that the default applies (as timm does).
        """
        kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
        opts = self.options(name)
        unknown = [k for k in kwargs if k not in opts]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, opts, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            accepted = ", ".join(opts) or "(none)"
            raise RegistryError(f"{self.kind} '{name}' has no option '{k}'.{hint} Accepted options: {accepted}")
        hints = _type_hints(self.get(name).factory)
        resolved: dict[str, Any] = {}
        for key, param in opts.items():
            if key in kwargs:
                value = kwargs[key]
                if key in hints:
                    value = _coerce(value, hints[key], f"{self.kind} '{name}' option '{key}'")
                resolved[key] = value
            elif param.default is inspect.Parameter.empty:
                raise RegistryError(f"{self.kind} '{name}' needs option '{key}'")
            else:
                resolved[key] = param.default
        return resolved

    def build(self, name: str, kwargs: dict | None = None, **facts):
        resolved = self.resolve(name, kwargs)
        factory = self.get(name).factory
        accepted = inspect.signature(factory).parameters
        given = {k: v for k, v in facts.items() if k in accepted}
        return factory(**resolved, **given)

    def slug(self, name: str, kwargs: dict) -> str:
        entry = self.get(name)
        return entry.slug(kwargs) if entry.slug else name


def _type_hints(factory) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:
        return {}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple annotation; ints pass as floats, lists as tuples."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise RegistryError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        errors = []
        for a in args:
            if a is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, a, where)
            except RegistryError as e:
                errors.append(str(e))
        raise RegistryError(errors[0] if len(errors) == 1 else f"{where} has the wrong type: {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise RegistryError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise RegistryError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RegistryError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RegistryError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise RegistryError(f"{where} must be a string, got {value!r}")
        return value
    return value


# One instance per kind. Facts are supplied by the platform, never by users.
SCHEDULE = Registry("schedule")
TIME_SAMPLER = Registry("time_sampler", facts=("schedule", "train_steps"))
TARGET = Registry("target", facts=("train_steps",))
WEIGHTING = Registry("weighting", facts=("data_shape", "schedule"))
BACKBONE = Registry("backbone", facts=("data_shape", "num_classes"))
GUIDANCE = Registry("guidance")
DATASET = Registry("dataset", facts=("device",))

DESIGN_KINDS: tuple[str, ...] = ("schedule", "time_sampler", "target", "weighting", "backbone", "guidance")
REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (SCHEDULE, TIME_SAMPLER, TARGET, WEIGHTING, BACKBONE, GUIDANCE, DATASET)
}
