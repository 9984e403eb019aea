#!/usr/bin/env bash
# Render a report.html to a PNG with headless Chromium (offline; nothing is fetched).
#
#   scripts/screenshot_report.sh [REPORT_HTML] [OUT_PNG] [WIDTH,HEIGHT]
#
# Defaults: if-query-demo/test_query/results/report.html (after `if-query demo` and
# `if-query report if-query-demo/test_query/results`), /tmp/report.png, 1400,2000.
# Needs the Debian package `chromium` (apt-get install -y chromium).
set -euo pipefail

report="${1:-if-query-demo/test_query/results/report.html}"
out="${2:-/tmp/report.png}"
size="${3:-1400,2000}"

if [[ ! -f "$report" ]]; then
    echo "error: $report: no such file (write one with: if-query report RESULTS_DIR)" >&2
    exit 2
fi
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [[ -z "$browser" ]]; then
    echo "error: chromium not found; install it with: apt-get update && apt-get install -y chromium" >&2
    exit 2
fi

report_path="$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
mkdir -p "$(dirname "$out")"
out_path="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT

"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$profile" --window-size="$size" \
    --screenshot="$out_path" "file://$report_path" >/dev/null 2>&1 || {
    echo "error: $browser failed to render $report_path" >&2
    exit 1
}
if [[ ! -s "$out_path" ]]; then
    echo "error: no screenshot written to $out_path" >&2
    exit 1
fi
echo "$out_path"
