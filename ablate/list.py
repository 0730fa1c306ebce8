"""``python -m ablate.list [KIND]``: every registered plugin with its options and defaults."""
from __future__ import annotations

import inspect
import sys

#: the kinds, for --help without importing the registries (importing them imports torch and every component:
#: seconds); tests/test_help.py checks it against the registries
KINDS = ("schedule", "time_sampler", "target", "weighting", "backbone", "guidance", "dataset", "feature_extractor",
         "preset")


def _all_registries() -> dict:
    import ablate.data  # noqa: F401  (registers the datasets)
    from ablate.features import FEATURE_EXTRACTOR  # evaluation plugins (imports torch-fidelity)
    from components.registry import REGISTRIES

    return {**REGISTRIES, "feature_extractor": FEATURE_EXTRACTOR}


def describe(kind: str) -> str:
    reg = _all_registries()[kind]
    lines = [f"{kind}"]
    for name in reg.names():
        entry = reg.get(name)
        src = "" if entry.source == "builtin" else f"  [{entry.source}]"
        lines.append(f"  {name}{src} — {entry.description}")
        for key, p in reg.options(name).items():
            default = "(required)" if p.default is inspect.Parameter.empty else repr(p.default)
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
            lines.append(f"      {key}: {ann} = {default}")
    return "\n".join(lines)


def describe_presets() -> str:
    from ablate.design import PRESETS

    lines = ["preset"]
    for name, d in sorted(PRESETS.items()):
        parts = ", ".join(f"{k}={v['name']}" for k, v in d.items() if not k.startswith("_"))
        lines.append(f"  {name} — {parts}")
        if d.get("_paper"):
            lines.append(f"      from: {d['_paper']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from ablate.cli import help_parser

    p = help_parser("python -m ablate.list", __doc__)
    p.add_argument("kind", nargs="?", help=f"one of: {', '.join(KINDS)} (default: all)")
    args = p.parse_args(argv)  # --help is answered here, before the registries are imported
    kinds = list(_all_registries()) + ["preset"]
    if args.kind and args.kind not in kinds:
        print(f"error: unknown kind '{args.kind}'; valid kinds: {', '.join(kinds)}", file=sys.stderr)
        return 2
    shown = [args.kind] if args.kind else kinds
    print("\n\n".join(describe_presets() if k == "preset" else describe(k) for k in shown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
