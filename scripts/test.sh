#!/usr/bin/env bash
# The test command: ruff (as configured in pyproject.toml), the unit tests (no ComfyUI), then every ComfyUI-dependent
# test against each ComfyUI checkout (COMFYUI_PATHS, default ~/comfy/ComfyUI and ~/comfy/ComfyUI-0.33), then
# ComfyUI's own execution suite with the pack installed. Extra arguments go to pytest (e.g. -k slerp).
# Set MEMORA_SKIP_COMFY_SUITE=1 to skip the last part.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEMORA_VENV:-$HOME/.cache/comfyui-memora/venv}"
# setup.sh is idempotent and quick when nothing changed; it also brings a venv made before pyproject.toml changed
# up to date (the test extra: ruff, hypothesis, ...)
bash "$ROOT/scripts/setup.sh" >/dev/null
export PATH="$VENV/bin:$PATH"   # ComfyUI's own tests start `python main.py`
cd "$ROOT"
status=0
echo "=== ruff check"
if python -c "import ruff" 2>/dev/null; then
  python -m ruff check . || status=1
else
  echo "ruff is not installed in $VENV: run bash scripts/setup.sh (it installs the test extra, ruff included)" >&2
  status=1
fi
python tests/run_matrix.py "$@" || status=$?
if [ "${MEMORA_SKIP_COMFY_SUITE:-0}" != 1 ] && [ $# -eq 0 ]; then
  python scripts/check_comfyui_suite.py || status=1
fi
exit $status
