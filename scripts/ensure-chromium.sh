#!/usr/bin/env bash
# The browser the report's tests open reports in: Debian's package chromium. Nothing to do when it is
# there; else it is installed with apt-get (as root, or through sudo); else this says what to install.
set -euo pipefail
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
install=(apt-get install -y --no-install-recommends chromium)
if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update && "${install[@]}" && exit 0
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update && sudo "${install[@]}" && exit 0
    fi
fi
echo "ensure-chromium: the tests need Chromium: install Debian's package 'chromium' (apt-get install chromium)" >&2
exit 1
