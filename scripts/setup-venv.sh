#!/usr/bin/env bash
# Create the project's virtual environment and install ptune into it, reproducibly.
#
#   scripts/setup-venv.sh [VENV]             what `make` runs; VENV defaults to .venv
#   scripts/setup-venv.sh --torch-only VENV  only create VENV and settle torch (no other installs)
#
# torch first, chosen for the machine, so that no GPU notebook is ever downgraded to a CPU build:
#   - an NVIDIA GPU and a CUDA torch already in the image's python3 (system, conda or venv): the new venv sees
#     the image's site-packages (through a .pth file, after its own) and keeps that torch;
#   - an NVIDIA GPU without one: torch $TORCH_VERSION from the package index (its Linux wheels are CUDA builds);
#   - no GPU: torch $TORCH_VERSION, the CPU build where the index offers one (set PIP_EXTRA_INDEX_URL to a CPU
#     wheel index to avoid downloading a CUDA build on a CPU-only machine).
# Then every other dependency at the versions pinned in requirements/constraints.txt.
set -euo pipefail

torch_only=0
if [ "${1:-}" = "--torch-only" ]; then torch_only=1; shift; fi
VENV=${1:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
image_has_cuda_torch() {
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' >/dev/null 2>&1
}

keep_image_torch=0
torch_plan="install torch==$TORCH_VERSION"
if has_gpu; then
  if image_has_cuda_torch; then
    keep_image_torch=1
    torch_plan="keep the image's CUDA torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  else
    torch_plan="install torch==$TORCH_VERSION (CUDA build) for the GPU"
  fi
fi
echo "setup-venv: $VENV; torch: $torch_plan"

"$PYTHON" -m venv "$VENV"
if [ $keep_image_torch = 1 ]; then
  # --system-site-packages would expose only the base interpreter's packages, not those of a conda env or
  # venv the image's python3 may live in; a .pth file adds exactly the image's site-packages, after ours.
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/ptune-image-site.pth"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
if [ $torch_only = 0 ]; then
  "${pip[@]}" install --quiet --upgrade "pip>=24"
fi
if [ $keep_image_torch = 0 ]; then
  "${pip[@]}" install --quiet "torch==$TORCH_VERSION"
fi
if [ $torch_only = 0 ]; then
  "${pip[@]}" install --quiet -c "$here/requirements/constraints.txt" -e "$here[test]"
fi
"$VENV/bin/python" - <<'PY'
import torch
where = f"CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}" if torch.version.cuda else "CPU build"
print(f"setup-venv: torch {torch.__version__} ({where}) from {torch.__file__}")
PY
