"""The math: one module per component kind. Importing this package registers the built-ins."""
from components import schedules, time_samplers, time_grids, weightings, guidance, targets, backbones  # noqa: F401
from components.registry import REGISTRIES, DESIGN_KINDS  # noqa: F401
