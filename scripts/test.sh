#!/usr/bin/env bash
# Install everything the test suite needs, then run it. Extra arguments go to pytest.
#  - Debian packages: chromium (browser bundles run in headless Chromium), kotlin and libandroid-json-java
#    (the Android loader's checksum code is compiled and run); the ARM64 test fetches its own emulator
#    and sysroot from Debian's archive into ~/.cache/edgepack.
#  - .venv with edgepack and its extras test, torch and freeze.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=()
command -v chromium >/dev/null 2>&1 || debs+=(chromium)
command -v kotlinc >/dev/null 2>&1 || debs+=(kotlin)
[ -f /usr/share/java/com.android.json.jar ] || debs+=(libandroid-json-java)
if [ ${#debs[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${debs[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first, pinned: the extra's open range would otherwise pull the newest build with GBs of CUDA packages
.venv/bin/python -m pip install -q --disable-pip-version-check 'torch==2.13.0'
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,torch,freeze]'
# lint, format and types first: seconds, and a finding fails the run like a test does
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
