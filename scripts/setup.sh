#!/usr/bin/env bash
# Set up the project in ./.venv (or the active venv/conda env) and install it.
#
#   bash scripts/setup.sh            # idempotent: a second run takes seconds
#
# CPU-only machine (no nvidia-smi): torch is pinned to the local CPU build
# (torch==2.13.0+cpu) through a constraints file, so no package drags in the
# multi-GB CUDA wheels. If torchvision (CUDA-only on PyPI) then fails to import,
# a small import hook makes its pure-Python parts importable.
# GPU machine: the normal torch build is used; nothing is patched.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ]]; then
  PY=python
else
  if [[ ! -x .venv/bin/python ]]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
fi

CONSTRAINTS=()
if ! command -v nvidia-smi >/dev/null 2>&1 && [[ "${ABLATE_FORCE_GPU:-0}" != 1 ]]; then
  echo "torch==2.13.0+cpu" > .venv-cpu-constraints.txt
  CONSTRAINTS=(-c .venv-cpu-constraints.txt)
  echo "[setup] no GPU found: pinning the CPU build of torch"
fi

EXTRAS="${ABLATE_EXTRAS:-dev}"
if ! "$PY" -m pip install -q "${CONSTRAINTS[@]}" -e ".[${EXTRAS}]" 2>.setup-pip.log; then
  cat .setup-pip.log >&2
  echo "[setup] pip install failed (log above)" >&2
  exit 1
fi

# torchvision from PyPI is CUDA-only for torch 2.13; on a CPU torch its import
# fails on its compiled ops. Detect that and install the import hook.
if ! "$PY" -c "import torchvision" >/dev/null 2>.setup-tv.log; then
  if grep -q "torchvision::" .setup-tv.log; then
    SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp scripts/torchvision_cpu_shim.py "$SITE/_ablate_torchvision_cpu_shim.py"
    echo "import _ablate_torchvision_cpu_shim as _m; _m.install()" > "$SITE/ablate-torchvision-cpu-shim.pth"
    echo "[setup] torchvision's compiled ops are unavailable on this torch: installed the import hook"
  else
    cat .setup-tv.log >&2
    exit 1
  fi
fi
"$PY" -c "import torch, timm, torch_fidelity, ablate; print(f'[setup] ok: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
