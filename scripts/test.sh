#!/usr/bin/env bash
# Install everything the test suite needs, then run it: a virtual environment in .venv with edgepack
# and its extras, and Debian's Chromium for the browser tests. Extra arguments go to pytest.
# (Also Debian's kotlin, for the Android loader test.)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# kotlinc and Android's org.json for the JVM: tests/test_mobile.py compiles and runs the Android loader's checksum code
if ! command -v kotlinc >/dev/null 2>&1 || [ ! -f /usr/share/java/com.android.json.jar ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kotlin libandroid-json-java >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first, pinned: the extra's open range would otherwise pull the newest build with GBs of CUDA packages
.venv/bin/python -m pip install -q --disable-pip-version-check 'torch==2.13.0'
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,torch,freeze]'
exec .venv/bin/python -m pytest "$@"
