#!/usr/bin/env bash
# What the browser test (tests/integration/test_ui_page.py) needs, installed if missing:
# Debian's chromium (/usr/bin/chromium) and Playwright's Python package, which drives that
# chromium (no browser download: the test launches it with executable_path).
#
#   bash tests/browser/install_browser.sh [python]     # default: .venv/bin/python, else python3
#
# Needs root for apt-get (as on the project's machines and in CI). Exits non-zero, saying why,
# when something cannot be installed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${1:-}"
if [ -z "$PYTHON" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
PLAYWRIGHT_VERSION="${PLAYWRIGHT_VERSION:-1.65.2}"

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install_browser: /usr/bin/chromium is missing and apt-get needs root: run 'apt-get install -y chromium' as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  echo "install_browser: apt-get install chromium" >&2
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
/usr/bin/chromium --version 2>/dev/null

if ! "$PYTHON" -c "import playwright.sync_api" 2>/dev/null; then
  echo "install_browser: pip install playwright==$PLAYWRIGHT_VERSION" >&2
  constraints=()
  [ -f "$ROOT/constraints.txt" ] && constraints=(-c "$ROOT/constraints.txt")
  "$PYTHON" -m pip install --quiet "${constraints[@]}" "playwright==$PLAYWRIGHT_VERSION"
fi
"$PYTHON" -c "from importlib.metadata import version; print('playwright', version('playwright'))"
