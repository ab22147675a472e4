#!/usr/bin/env bash
# Create the project's virtual environment and install ptune into it, reproducibly.
#
#   scripts/setup-venv.sh [VENV]             what `make` runs; VENV defaults to .venv
#   scripts/setup-venv.sh --torch-only VENV  only create VENV and settle torch (no other installs)
#   scripts/setup-venv.sh --legacy VENV PY   the ChatGLM-6B remote code's environment (see below)
#
# torch first, chosen for the machine, so that no GPU notebook is ever downgraded to a CPU build:
#   - an NVIDIA GPU and a CUDA torch already in the image's python3 (system, conda or venv): the new venv sees
#     the image's site-packages (through a .pth file, after its own) and keeps that torch;
#   - an NVIDIA GPU without one: torch $TORCH_VERSION from the package index (its Linux wheels are CUDA builds);
#   - no GPU: torch $TORCH_VERSION, the CPU build where the index offers one (set PIP_EXTRA_INDEX_URL to a CPU
#     wheel index to avoid downloading a CUDA build on a CPU-only machine).
# Then every other dependency at the version and sha256 that requirements/lock.txt records (written by `make lock`
# with pip-compile; pip checks each download against its hashes), and ptune itself from the checkout, editable.
#
# --legacy: VENV is layered over the main environment of interpreter PY (its site directories follow VENV's own
# on sys.path, so torch, CUDA build included, and every other package come from there) and gets only what
# requirements/legacy.txt says must differ (transformers 4.33 for ChatGLM-6B's remote code), at the versions of
# requirements/legacy-constraints.txt.
# ptune itself is importable from the checkout. Run by `python -m ptune.model.legacy_env ensure`, which checks whether
# the environment is up to date first.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = "--legacy" ]; then
  VENV=$2
  MAIN_PYTHON=$3
  echo "setup-venv: $VENV for ChatGLM-6B's remote code (requirements/legacy.txt), layered over $MAIN_PYTHON"
  rm -rf "$VENV"
  "$MAIN_PYTHON" -m venv "$VENV"  # the same Python version, so that the main environment's packages fit
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # sys.path of the main environment after its own .pth files ran (a GPU image's site-packages included), not
  # just its site-packages: .pth files in directories added this way are not processed again.
  "$MAIN_PYTHON" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    > "$site/ptune-main-env.pth"
  echo "$here/workflow" >> "$site/ptune-main-env.pth"
  "$VENV/bin/python" -m pip --disable-pip-version-check install --quiet \
    -c "$here/requirements/legacy-constraints.txt" -r "$here/requirements/legacy.txt"
  "$VENV/bin/python" -c 'import torch, transformers; print(f"setup-venv: legacy environment ready: transformers {transformers.__version__}, torch {torch.__version__} from {torch.__file__}")'
  exit 0
fi

torch_only=0
if [ "${1:-}" = "--torch-only" ]; then torch_only=1; shift; fi
VENV=${1:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}

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
  # --no-deps: the lock is complete (pip-compile resolved it) and leaves torch out (settled above, per machine).
  "${pip[@]}" install --quiet --require-hashes --no-deps -r "$here/requirements/lock.txt"
  "${pip[@]}" install --quiet --no-deps -e "$here"
fi
"$VENV/bin/python" - <<'PY'
import torch
where = f"CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}" if torch.version.cuda else "CPU build"
print(f"setup-venv: torch {torch.__version__} ({where}) from {torch.__file__}")
PY
