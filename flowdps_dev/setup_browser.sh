#!/usr/bin/env bash
# Browser part of the set-up (called by setup.sh; also runnable alone): Debian's chromium and playwright-core,
# for the real-frontend workflow test (tests/test_browser_workflows.py, flowdps_dev/frontend.py).
#   * chromium from Debian's package registry with apt-get, only when /usr/bin/chromium is missing
#     (CI runs as root on a fresh Debian machine; elsewhere sudo is used if it needs no password).
#   * playwright-core, pinned exactly by flowdps_dev/browser/package-lock.json, installed with `npm ci`
#     into $CACHE/browser/node_modules (never into the repository). Playwright downloads no browser: the
#     script launches /usr/bin/chromium.
# Idempotent: the npm step is stamped with the hash of package.json + package-lock.json.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CACHE:-$ROOT/.cache}
CHROMIUM=${FLOWDPS_CHROMIUM:-/usr/bin/chromium}
SRC=$ROOT/flowdps_dev/browser
DEST=$CACHE/browser
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "[setup:browser] $*"; }

# 1. chromium (Debian package) ----------------------------------------------------------------------------
if [ ! -x "$CHROMIUM" ]; then
  T=$(now)
  SUDO=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then SUDO=(sudo -n); else
      log "$CHROMIUM is missing and this user cannot run apt-get: install Debian's chromium (apt-get install chromium) as root"
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$CACHE"
  # a fresh machine has no package lists yet: update when apt does not know the package, or when the install
  # fails (stale lists name files the mirror no longer has), then try once more
  UPDATED=0
  if ! apt-cache show chromium > /dev/null 2>&1; then "${SUDO[@]}" apt-get update -q > "$CACHE/apt-update.log" 2>&1; UPDATED=1; fi
  if ! "${SUDO[@]}" apt-get install -y -q chromium > "$CACHE/apt-chromium.log" 2>&1; then
    [ "$UPDATED" = 1 ] || "${SUDO[@]}" apt-get update -q > "$CACHE/apt-update.log" 2>&1 || true
    "${SUDO[@]}" apt-get install -y -q chromium > "$CACHE/apt-chromium.log" 2>&1 \
      || { tail -20 "$CACHE/apt-chromium.log"; log "apt-get install chromium failed (log: $CACHE/apt-chromium.log)"; exit 1; }
  fi
  [ -x "$CHROMIUM" ] || { log "apt-get installed chromium but $CHROMIUM does not exist"; exit 1; }
  log "chromium installed with apt-get in $(elapsed "$T") s"
fi

# 2. playwright-core (npm ci from the committed lock file) ---------------------------------------------------
command -v node > /dev/null && command -v npm > /dev/null || { log "node and npm are needed (Node.js >= 20)"; exit 1; }
NODE_MAJOR=$(node -p 'process.versions.node.split(".")[0]')
[ "$NODE_MAJOR" -ge 20 ] || { log "Node.js >= 20 is needed by playwright-core (found $(node --version))"; exit 1; }
STAMP=$DEST/.stamp-$(cat "$SRC/package.json" "$SRC/package-lock.json" | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ ! -f "$DEST/node_modules/playwright-core/package.json" ]; then
  T=$(now)
  rm -rf "$DEST"
  mkdir -p "$DEST"
  cp "$SRC/package.json" "$SRC/package-lock.json" "$DEST/"
  # --ignore-scripts: no install scripts run (playwright-core has none; no browser is downloaded)
  (cd "$DEST" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
    || { log "npm ci failed in $DEST"; exit 1; }
  touch "$STAMP"
  log "playwright-core $(node -p "require('$DEST/node_modules/playwright-core/package.json').version") installed with npm ci in $(elapsed "$T") s"
fi
