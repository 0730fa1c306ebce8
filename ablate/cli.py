"""Shared command-line handling: one clear message and a non-zero exit, no traceback wall.

``--help`` is answered before anything heavy is imported (torch, Ray, MLflow): :func:`run_cli` parses the
arguments first, and a module whose own imports are heavy calls :func:`early_help` at its top. Help texts are
the modules' docstrings with their reStructuredText markup (````code````, ``:func:`x```) rendered plainly.
A configuration error is reported once per cause, attributed to where it comes from: a problem that a
command-line override causes is reported once, under "command line", even when every design of a study
repeats it.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


# -- help texts --------------------------------------------------------------------------------------
def plain(text: str) -> str:
    """Docstring markup rendered plainly: ````code```` -> code, ``:role:`~a.b.C``` -> C, ``:role:`a.b``` -> a.b."""
    text = re.sub(r":\w+:`~[\w.]*?\.?(\w+)`", r"\1", text)
    text = re.sub(r":\w+:`([^`]+)`", r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text, flags=re.S)
    return re.sub(r"(?<![`\w])`([^`\s][^`]*)`(?![`\w])", r"\1", text)


def _width() -> int:
    return max(40, min(shutil.get_terminal_size((100, 24)).columns, 120) - 2)


def _wrap_doc(doc: str) -> str:
    """A docstring for --help: markup rendered plainly, prose re-wrapped to the terminal, indented blocks kept."""
    out = []
    for para in textwrap.dedent(plain(doc or "")).strip().split("\n\n"):
        lines = para.split("\n")
        if all(ln.startswith((" ", "-")) or not ln.strip() for ln in lines):  # examples and lists: as written
            out.append(para)
        else:
            out.append(textwrap.fill(" ".join(ln.strip() for ln in lines), _width(), break_on_hyphens=False))
    return "\n\n".join(out)


def help_parser(prog: str, doc: str = "", epilog: str | None = None, defaults: bool = False,
                **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is ``doc`` (a module docstring) rendered plainly; ``defaults``: each
    option's help ends with its default (where it has one)."""
    return argparse.ArgumentParser(prog=prog, description=_wrap_doc(doc), epilog=epilog,
                                   formatter_class=_DefaultsFormatter if defaults else _Formatter, **kwargs)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog, **kwargs):
        kwargs.setdefault("width", _width())
        super().__init__(prog, **kwargs)


class _DefaultsFormatter(_Formatter):
    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and action.option_strings \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def presets() -> list[tuple[str, str]]:
    """The built-in presets as (name, source paper), read from ablate/design.py's ``register_preset`` calls
    without importing it (importing it imports torch and every component: seconds); ``tests/test_help.py``
    checks that this matches ``ablate.design.PRESETS``."""
    try:
        tree = ast.parse(Path(__file__).with_name("design.py").read_text())
    except (OSError, SyntaxError):
        return []
    found: dict[str, str] = {}

    def calls(node):
        return [n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "register_preset"
                and n.args]

    def paper(call) -> str:
        kw = next((k.value for k in call.keywords if k.arg == "paper"), None)
        return kw.value if isinstance(kw, ast.Constant) and isinstance(kw.value, str) else ""

    looped = set()
    for loop in (n for n in ast.walk(tree) if isinstance(n, ast.For)):
        names = [e.id if isinstance(e, ast.Name) else None
                 for e in (loop.target.elts if isinstance(loop.target, ast.Tuple) else [loop.target])]
        try:
            items = ast.literal_eval(loop.iter)
        except ValueError:
            continue
        for call in calls(loop):
            first = call.args[0]
            if isinstance(first, ast.Name) and first.id in names:
                i = names.index(first.id)
                for item in items:
                    value = item[i] if isinstance(item, (tuple, list)) else item
                    if isinstance(value, str):
                        found[value] = paper(call)
                looped.add(id(call))
    for call in calls(tree):
        first = call.args[0]
        if id(call) not in looped and isinstance(first, ast.Constant) and isinstance(first.value, str):
            found[first.value] = paper(call)
    return sorted(found.items())


def presets_epilog() -> str:
    width = _width()
    rows = presets()
    if not rows:
        return ""
    pad = max(len(n) for n, _ in rows) + 2
    lines = ["presets (TARGET may be one of these; python -m ablate.list preset shows their components):"]
    for name, paper in rows:
        text = textwrap.shorten(paper, max(20, width - pad - 2), placeholder=" …") if paper else ""
        lines.append(f"  {name:<{pad}}{text}".rstrip())
    return "\n".join(lines)


def parser(prog: str, description: str = "", doc: str | None = None) -> argparse.ArgumentParser:
    """The arguments of ``python -m ablate.train`` (a study file or a preset, overrides, --dry-run)."""
    p = help_parser(prog, doc if doc is not None else description, epilog=presets_epilog())
    p.add_argument("target", nargs="?", default=None, help="a study file (.yaml) or a preset name (listed below)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (Hydra syntax), e.g. train.steps=500")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and design, exit")
    return p


def help_requested(argv: list[str] | None = None) -> bool:
    """Whether ``argv`` (default: sys.argv[1:]) asks for --help (also abbreviated, e.g. --he), before any ``--``."""
    for a in sys.argv[1:] if argv is None else argv:
        if a == "--":
            return False
        if a == "-h" or (len(a) > 3 and a.startswith("--h") and "--help".startswith(a)):
            return True
    return False


def early_help(make_parser, *args, argv: list[str] | None = None) -> None:
    """Answer --help and exit, for a module whose imports are heavy: call it at the top of the module, before them,
    under ``if __name__ == "__main__"`` (``python -m`` runs the module's imports before its ``main``)."""
    if help_requested(argv):
        make_parser(*args).parse_args(sys.argv[1:] if argv is None else argv)  # prints the help, exits 0
        raise SystemExit(0)


# -- errors ----------------------------------------------------------------------------------------
def run_cli(fn, argv, prog: str, make_parser=None) -> int:
    # the arguments first: --help (and a usage error) is answered before anything heavy is imported
    args = (make_parser or parser)(prog).parse_args(argv)
    if getattr(args, "overrides", None) is not None and args.target is not None and "=" in args.target:
        # only overrides given: start from the defaults
        args.overrides, args.target = [args.target, *args.overrides], None
    from ablate.config import ConfigError
    from ablate.data import DataError
    from ablate.design import DesignError
    from ablate.train import DivergenceError
    from components.registry import RegistryError

    overrides = [str(o) for o in getattr(args, "overrides", None) or []]
    try:
        return fn(args)
    except ConfigError as exc:
        where, lines = attribute(exc.source, exc.problems, overrides)
        _err(f"invalid configuration ({where}):", lines)
        return EXIT_BAD_INPUT
    except DesignError as exc:
        where, lines = attribute(str(args.target), exc.problems, overrides)
        _err(f"invalid design ({where}):", lines)
        return EXIT_BAD_INPUT
    except (RegistryError, DataError, FileNotFoundError) as exc:
        _err(f"{args.target}: {exc}")
        return EXIT_BAD_INPUT
    except DivergenceError as exc:
        _err(f"training diverged: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted; finished checkpoints are kept and the same command resumes")
        return 130
    except ValueError as exc:
        if os.environ.get("ABLATE_DEBUG"):
            raise
        _err(f"{args.target}: {exc}")
        return EXIT_BAD_INPUT


COMMAND_LINE = "command line"
_TRIAL = re.compile(r" \(in trial (?P<trial>.*)\)$")
_NO_OPTION = re.compile(r"^(?P<kind>\w+) '(?P<name>[^']+)' has no option '(?P<opt>[^']+)'\.(?: Did you mean "
                        r"'(?P<hint>[^']+)'\?)?(?: Accepted options: .*)?$")
_PLUGIN = re.compile(r"^(?P<kind>\w+) '(?P<name>[^']+)' (?P<rest>.+)$", re.S)


def _parse_override(text: str) -> tuple[str, str] | None:
    key, eq, value = text.partition("=")
    key = key.lstrip("+~").strip()
    return (key, value.strip()) if key else None


def _cause(key: str, message: str, overrides: list[str]) -> str | None:
    """The command-line override that causes the problem (``key``, ``message``), or None (the file's)."""
    best = None
    for text in overrides:
        parsed = _parse_override(text)
        if parsed is None or not key:
            continue
        okey, value = parsed
        if key == okey or key.startswith(okey + "."):  # the override set this value (or the section holding it)
            score = len(okey) + 1000
        elif okey.startswith(key + "."):  # a problem reported on the section the override writes into
            leaf = okey.rsplit(".", 1)[-1]
            words = set(re.findall(r"[\w.\-]+", message))
            if leaf not in words and (not value or value.strip("'\"") not in words):
                continue
            score = len(okey)
        else:
            continue
        if best is None or score > best[0]:
            best = (score, text)
    return best[1] if best else None


def attribute(source: str, problems, overrides: list[str] = ()) -> tuple[str, list[str]]:
    """(source, lines) of one error: a problem a command-line override causes is keyed by the override (and the
    source says "command line"), the others by their key under ``source``; the same cause repeated by several
    trials (designs) is one line."""
    groups: dict[tuple, dict] = {}
    sources = []
    for key, message in problems:
        message = str(message)
        override = _cause(str(key or ""), message, list(overrides))
        sources.append(COMMAND_LINE if override else source)
        label = override or str(key or "<file>")
        m = _TRIAL.search(message)
        trial = m.group("trial") if m else None
        text = message[:m.start()] if m else message
        no_opt, plug = _NO_OPTION.match(text), _PLUGIN.match(text)
        if no_opt:
            group = ("no-option", label, no_opt["kind"], no_opt["opt"])
        elif plug:
            group = ("plugin", label, plug["kind"], plug["rest"])
        else:
            group = ("same", label, text)
        entry = groups.setdefault(group, {"label": label, "texts": [], "trials": []})
        entry["texts"].append(text)
        if trial is not None:
            entry["trials"].append(trial)
    lines = [f"{e['label']}: {_merge(group, e['texts'], e['trials'])}" for group, e in groups.items()]
    if sources and all(s == COMMAND_LINE for s in sources):
        where = COMMAND_LINE
    elif COMMAND_LINE in sources and COMMAND_LINE not in source:
        where = f"{source}, {COMMAND_LINE}"
    else:
        where = source
    return where, lines


def _merge(group: tuple, texts: list[str], trials: list[str]) -> str:
    trials = list(dict.fromkeys(trials))
    where = f" (in trial {trials[0]})" if len(trials) == 1 else f" (in {len(trials)} trials)" if trials else ""
    unique = list(dict.fromkeys(texts))
    if len(unique) == 1:
        return unique[0] + where
    if group[0] == "no-option":
        _, _, kind, opt = group
        matches = [_NO_OPTION.match(t) for t in unique]
        names = list(dict.fromkeys(m["name"] for m in matches))
        hints = list(dict.fromkeys(m["hint"] for m in matches if m["hint"]))
        with_hint = list(dict.fromkeys(m["name"] for m in matches if m["hint"]))
        text = f"{kind} {', '.join(repr(n) for n in names)} {'has' if len(names) == 1 else 'have'} no option '{opt}'"
        if hints:
            text += f". Did you mean {' or '.join(repr(h) for h in hints)}? ({', '.join(with_hint)} " \
                    f"{'has' if len(with_hint) == 1 else 'have'} it)"
        return text + where
    if group[0] == "plugin":
        _, _, kind, rest = group
        names = list(dict.fromkeys(_PLUGIN.match(t)["name"] for t in unique))
        return f"{kind} {', '.join(repr(n) for n in names)}: {rest}{where}"
    return unique[0] + where


def _err(head: str, lines: list[str] = ()) -> None:
    print(f"error: {head}", file=sys.stderr)
    for ln in lines:
        print(f"  - {ln}", file=sys.stderr)
