#!/usr/bin/env bash
# The test command: provisions what the suites need, then runs `cargo test` with this
# script's arguments (`./test.sh --test semantics`, `./test.sh -- --nocapture`, ...).
#
# - pika + pytest (tests/python/requirements.txt) in a virtualenv under target/, for
#   tests/pika.rs; tests/pika.rs runs the interpreter named by WARREN_PYTHON.
# - Debian's chromium (apt-get; sudo when not root) for tests/ui.rs, unless CHROMIUM
#   or /usr/bin/chromium already names one.
# - The UI suite's npm packages (`npm ci --prefix tests/ui`) when tests/ui/node_modules
#   is missing or older than tests/ui/package-lock.json.
#
# Each step is skipped when its result is already there, so a second run goes straight
# to `cargo test`. Needs the toolchains only: Rust, Python 3 with pip, Node 20 + npm, apt.
set -euo pipefail
cd "$(dirname "$0")"

say() { echo "test.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "not root and no sudo: cannot run $*"
        return 1
    fi
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# --- pika + pytest -------------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-target}
venv="$target_dir/test-venv"
req=tests/python/requirements.txt
stamp="$venv/.requirements.sha256"
if [ "$(cat "$stamp" 2>/dev/null)" != "$(sha "$req")" ] \
    || ! "$venv/bin/python" -c 'import pika, pytest' 2>/dev/null; then
    say "installing $req into $venv"
    rm -rf "$venv"
    if python3 -m venv "$venv" 2>/dev/null; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
        sha "$req" >"$stamp"
    else
        # No venv module (Debian without python3-venv): the user's site-packages.
        rm -rf "$venv"
        say "python3 -m venv is unavailable; installing with pip --user"
        PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user \
            --disable-pip-version-check -r "$req"
    fi
fi
if [ -x "$venv/bin/python" ]; then
    WARREN_PYTHON="$(cd "$venv/bin" && pwd)/python"
else
    WARREN_PYTHON=python3
fi
export WARREN_PYTHON

# --- chromium ------------------------------------------------------------------------
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
    say "installing Debian's chromium"
    # Without package lists (a fresh image) the install fails fast; update and retry.
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
    CHROMIUM=/usr/bin/chromium
fi

# --- npm packages of the UI suite ----------------------------------------------------
lock=tests/ui/package-lock.json
npm_stamp=tests/ui/node_modules/.warren-lock.sha256
if [ "$(cat "$npm_stamp" 2>/dev/null)" != "$(sha "$lock")" ]; then
    say "npm ci --prefix tests/ui"
    npm ci --prefix tests/ui --no-audit --no-fund --loglevel=error
    sha "$lock" >"$npm_stamp"
fi

# --- the tests -----------------------------------------------------------------------
exec cargo test "$@"
