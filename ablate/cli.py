"""Shared command-line handling: one clear message and a non-zero exit, no traceback wall."""
from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def parser(prog: str, description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("target", nargs="?", default=None, help="a study file (.yaml) or a preset name")
    p.add_argument("overrides", nargs="*", help="key=value overrides (Hydra syntax), e.g. train.steps=500")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and design, exit")
    return p


def run_cli(fn, argv, prog: str, make_parser=None) -> int:
    from ablate.config import ConfigError
    from ablate.data import DataError
    from ablate.design import DesignError
    from ablate.train import DivergenceError
    from components.registry import RegistryError

    args = (make_parser or parser)(prog).parse_args(argv)
    if getattr(args, "overrides", None) is not None and args.target is not None and "=" in args.target:  # only overrides given: start from the defaults
        args.overrides, args.target = [args.target, *args.overrides], None
    try:
        return fn(args)
    except ConfigError as exc:
        _err(f"invalid configuration ({exc.source}):", [f"{k or '<file>'}: {m}" for k, m in exc.problems])
        return EXIT_BAD_INPUT
    except DesignError as exc:
        _err(f"invalid design ({args.target}):", [f"{k}: {m}" for k, m in exc.problems])
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


def _err(head: str, lines: list[str] = ()) -> None:
    print(f"error: {head}", file=sys.stderr)
    for ln in lines:
        print(f"  - {ln}", file=sys.stderr)
