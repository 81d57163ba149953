#!/usr/bin/env bash
# Open ComfyUI's editor with this pack, in the environment scripts/setup.sh built:
#
#   bash scripts/editor.sh                      # http://127.0.0.1:8188 (ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI)
#   bash scripts/editor.sh --comfyui ~/comfy/ComfyUI-0.33 --port 8190 [-- more ComfyUI options]
#
# setup.sh leaves ComfyUI's front-end package out of the shared environment (two checkouts pin different versions);
# this installs the version the chosen checkout pins, once, into its own folder
# (~/.cache/comfyui-memora/frontend/<version>, pip --target --no-deps: the environment itself is not changed; the
# browser test uses the same folder) and starts that checkout's main.py with --front-end-root pointing there.
# The server runs in a workspace of its own ($MEMORA_EDITOR_HOME, default ~/.cache/comfyui-memora/editor/<checkout>):
# custom_nodes/ holds only this pack (a link to this folder), models/ is a link to the checkout's models/ (your
# checkpoints, LoRAs and unlearned weights; see docs/models.md), input/, output/ and user/ are its own. The checkout
# is not modified. Ctrl-C stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEMORA_VENV:-$HOME/.cache/comfyui-memora/venv}"
CACHE="${MEMORA_CACHE:-$HOME/.cache/comfyui-memora}"
COMFY="${COMFYUI_PATH:-$HOME/comfy/ComfyUI}"
PORT=8188
LISTEN=127.0.0.1
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --comfyui) COMFY="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --listen) LISTEN="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "editor.sh: unknown option $1 (known: --comfyui PATH, --port N, --listen HOST, -- ComfyUI options)" >&2
       exit 2 ;;
  esac
done
log() { printf '[editor] %s\n' "$*" >&2; }

[ -x "$VENV/bin/python" ] || { log "no environment at $VENV: run bash scripts/setup.sh first"; exit 1; }
[ -f "$COMFY/main.py" ] || { log "no ComfyUI checkout at $COMFY (set --comfyui or COMFYUI_PATH)"; exit 1; }
COMFY="$(cd "$COMFY" && pwd)"
VERSION="$(sed -nE 's/^comfyui-frontend-package[[:space:]]*==[[:space:]]*([0-9A-Za-z.]+).*/\1/p' \
  "$COMFY/requirements.txt" | head -n1)"
[ -n "$VERSION" ] || { log "$COMFY/requirements.txt pins no comfyui-frontend-package version"; exit 1; }

TARGET="$CACHE/frontend/$VERSION"
STATIC="$TARGET/comfyui_frontend_package/static"
if [ ! -f "$STATIC/index.html" ]; then
  log "installing comfyui-frontend-package==$VERSION (the front end $COMFY pins) into $TARGET"
  mkdir -p "$CACHE/frontend"
  TMP="$(mktemp -d "$CACHE/frontend/.$VERSION-XXXXXX")"
  if ! "$VENV/bin/python" -m pip install -q --no-deps --target "$TMP" "comfyui-frontend-package==$VERSION" \
      || [ ! -f "$TMP/comfyui_frontend_package/static/index.html" ]; then
    rm -rf "$TMP"
    log "could not install comfyui-frontend-package==$VERSION (is PyPI reachable?)"
    exit 1
  fi
  mv -T "$TMP" "$TARGET" 2>/dev/null || rm -rf "$TMP"  # another process may have installed it meanwhile
fi

HOME_DIR="${MEMORA_EDITOR_HOME:-$CACHE/editor/$(basename "$COMFY")}"
mkdir -p "$HOME_DIR/custom_nodes" "$HOME_DIR/input" "$HOME_DIR/output" "$HOME_DIR/user" "$COMFY/models"
[ -e "$HOME_DIR/custom_nodes/comfyui-memora" ] || ln -s "$ROOT" "$HOME_DIR/custom_nodes/comfyui-memora"
[ -e "$HOME_DIR/models" ] || ln -s "$COMFY/models" "$HOME_DIR/models"

DB=()  # ComfyUI >= 0.33 keeps a database, by default inside the checkout: keep it in the workspace instead
grep -q -- '"--database-url"' "$COMFY/comfy/cli_args.py" 2>/dev/null && DB=(--database-url "sqlite:///$HOME_DIR/user/comfyui.db")
DEVICE=()
"$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || DEVICE=(--cpu)
log "ComfyUI $COMFY with comfyui-memora and front end $VERSION: open http://$LISTEN:$PORT (Ctrl-C stops it)"
log "templates: Workflow > Browse Templates > comfyui-memora (start with memora_recovery_micro: nothing to download)"
cd "$COMFY"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" main.py --base-directory "$HOME_DIR" --front-end-root "$STATIC" --listen "$LISTEN" \
  --port "$PORT" ${DB[@]+"${DB[@]}"} ${DEVICE[@]+"${DEVICE[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
