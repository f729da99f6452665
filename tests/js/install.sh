#!/usr/bin/env bash
# Install the Perspective JS client flavours used by tests/js/scenario.mjs.
#
#   bash tests/js/install.sh          # both flavours (v4 and v5)
#   bash tests/js/install.sh v5       # just one
#
# Uses `npm ci` against the committed package-lock.json files, so it is
# reproducible and non-interactive (safe with CI=true and no stdin).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v npm >/dev/null 2>&1; then
    echo "install.sh: npm not found (need Node.js >= 20 and npm)" >&2
    exit 1
fi

if [ "$#" -eq 0 ]; then
    set -- v4 v5
fi

for flavour in "$@"; do
    dir="$here/$flavour"
    if [ ! -f "$dir/package-lock.json" ]; then
        echo "install.sh: no such flavour: $flavour" >&2
        exit 1
    fi
    echo "install.sh: npm ci in tests/js/$flavour" >&2
    (
        cd "$dir"
        npm ci --no-audit --no-fund --loglevel=error --ignore-scripts </dev/null
    )
done
