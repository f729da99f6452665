#!/usr/bin/env bash
# Install playwright-core for tests/browser/dashboard.mjs, which drives the system's chromium
# (/usr/bin/chromium, from apt: playwright-core downloads no browser of its own).
#
#   bash tests/browser/install.sh
#
# Uses `npm ci` against the committed package-lock.json, so it is reproducible and
# non-interactive (safe with CI=true and no stdin).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v npm >/dev/null 2>&1; then
    echo "install.sh: npm not found (need Node.js >= 20 and npm)" >&2
    exit 1
fi
if [ ! -x /usr/bin/chromium ]; then
    echo "install.sh: warning: /usr/bin/chromium missing (apt-get install chromium);" \
        "tests/test_browser.py will fail without it" >&2
fi

echo "install.sh: npm ci in tests/browser" >&2
cd "$here"
npm ci --no-audit --no-fund --loglevel=error --ignore-scripts </dev/null
