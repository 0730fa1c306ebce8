"""Target estimators (DESIGN §3): each returns per-sample prediction and stop-gradient target."""
from components.targets import flow_matching, shortcut, meanflow, consistency, imm  # noqa: F401
from components.targets import imf, alphaflow, tvm, split_meanflow  # noqa: F401  (the 2026 design space)
from components.targets.base import Nets, Problem, Target, TargetOutput  # noqa: F401
