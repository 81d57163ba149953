#!/usr/bin/env bash
# Set up everything comfyui-memora needs on a fresh machine, idempotently:
#   - a virtual environment ($MEMORA_VENV, default ~/.cache/comfyui-memora/venv) with torch and ComfyUI's requirements;
#   - ComfyUI checkouts: $COMFYUI_PATHS (colon-separated) or ~/comfy/ComfyUI (+ ~/comfy/ComfyUI-0.33 if present);
#     a missing default one is installed with comfy-cli (`comfy install`, a git clone);
#   - this pack, installed editable with its test extra (gives the `memora-batch` command);
#   - with --browser: Debian's chromium for the front-end test (root + apt only).
# Safe to re-run: what is there is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEMORA_VENV:-$HOME/.cache/comfyui-memora/venv}"
BROWSER=0
for a in "$@"; do
  case "$a" in
    --browser) BROWSER=1 ;;
    *) echo "setup.sh: unknown option $a (known: --browser)" >&2; exit 2 ;;
  esac
done
log() { printf '[setup] %s\n' "$*"; }
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  quiet_pip install -q --upgrade pip
fi

if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing torch + torchvision"
  quiet_pip install -q torch torchvision
fi
if ! "$VENV/bin/python" -c "import torchaudio" >/dev/null 2>&1; then
  # ComfyUI >= 0.33 imports torchaudio; --no-deps keeps the torch already installed.
  quiet_pip install -q --no-deps torchaudio || log "torchaudio not installed (only ComfyUI >= 0.33 needs it)"
fi

# ComfyUI checkouts
if [ -n "${COMFYUI_PATHS:-}" ]; then
  IFS=: read -r -a CHECKOUTS <<< "$COMFYUI_PATHS"
else
  CHECKOUTS=("${COMFYUI_PATH:-$HOME/comfy/ComfyUI}")
  [ -f "$HOME/comfy/ComfyUI-0.33/main.py" ] && CHECKOUTS+=("$HOME/comfy/ComfyUI-0.33")
fi
[ -x "$VENV/bin/comfy" ] || quiet_pip install -q comfy-cli
for c in "${CHECKOUTS[@]}"; do
  if [ ! -f "$c/main.py" ]; then
    log "no ComfyUI at $c: installing it with comfy-cli (git clone)"
    "$VENV/bin/comfy" --skip-prompt --workspace "$c" install --cpu --skip-manager --skip-torch-or-directml \
      || { log "could not install ComfyUI at $c; clone https://github.com/comfyanonymous/ComfyUI there yourself"; exit 1; }
  fi
done

# ComfyUI's requirements (the front-end/template/docs wheels are pinned per ComfyUI version and optional when
# running headless: they are left out so two checkouts can share one environment).
REQS=$(mktemp)
for c in "${CHECKOUTS[@]}"; do
  grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio)\b|^comfyui-(frontend-package|workflow-templates|embedded-docs)' "$c/requirements.txt" >> "$REQS" || true
done
sort -u "$REQS" -o "$REQS"
STAMP="$VENV/.memora-reqs-$( (cat "$REQS" "$ROOT/pyproject.toml"; echo "$ROOT") | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  log "installing ComfyUI's requirements and comfyui-memora (editable, with test extras)"
  quiet_pip install -q -r "$REQS"
  quiet_pip install -q -e "$ROOT[test]"
  touch "$STAMP"
fi
rm -f "$REQS"

if [ "$BROWSER" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "chromium missing and cannot be installed here: the browser test will be skipped"
  fi
fi
log "ready: venv $VENV; ComfyUI: ${CHECKOUTS[*]}"
