"""Make torchvision's pure-Python parts importable on a CPU-only torch.

PyPI only ships CUDA builds of torchvision for torch 2.13. On a CPU torch its
compiled ops fail to load, and ``torchvision/_meta_registrations.py`` then dies
with ``operator torchvision::nms does not exist`` at import time, which takes
``timm`` and ``torch_fidelity`` down with it. Nothing in this project uses the
compiled ops (nms, roi_align, ...), so the fake-tensor registrations for them
are replaced by an empty module. Installed by ``scripts/setup.sh`` (as a
``.pth`` hook) only when the plain import fails.
"""
import importlib.abc
import importlib.machinery
import sys

_TARGET = "torchvision._meta_registrations"


class _EmptyModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__doc__ = "Skipped: torchvision's compiled ops are unavailable on this torch build."


class _SkipMetaRegistrations(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        return importlib.machinery.ModuleSpec(fullname, _EmptyModuleLoader())


def install() -> None:
    if not any(isinstance(f, _SkipMetaRegistrations) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipMetaRegistrations())
