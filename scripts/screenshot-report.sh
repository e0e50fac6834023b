#!/usr/bin/env bash
# Render an eval report in headless Chromium and save a screenshot, to look at it:
#   scripts/screenshot-report.sh runs/demo-XXXX/run/eval/report.html report.png
# Needs Debian's `chromium` (apt-get install chromium). The page loads nothing from the network.
set -euo pipefail
report=$(realpath "$1"); out=$(realpath -m "${2:-report.png}")
profile=$(mktemp -d); trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
  --user-data-dir="$profile" --window-size=1200,1400 --screenshot="$out" "file://$report" \
  >/dev/null 2>&1
echo "$out"
