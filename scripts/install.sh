#!/usr/bin/env bash
# Installs livecc-pipeline: the system packages it needs (Debian/Ubuntu) and the package itself, into a
# virtual environment (see docs/install.md for what goes where).
#   bash scripts/install.sh                      # ffmpeg, fonts, the package (CPU or GPU torch from PyPI)
#   bash scripts/install.sh --test               # also the test servers and test libraries (what CI runs)
#   LIVECC_EXTRAS=gpu bash scripts/install.sh    # also flash-attn / liger-kernel (needs CUDA)
#   LIVECC_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/install.sh   # CPU-only torch
# Python: the active virtual environment ($VIRTUAL_ENV) if there is one, else $LIVECC_VENV (default .venv
# in this checkout), created with ${PYTHON:-python3} -m venv. A distribution's own python3 (PEP 668,
# "externally-managed-environment") is never pip-installed into.
set -euo pipefail
cd "$(dirname "$0")/.."

TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "install.sh: unknown option $arg (use --test)" >&2; exit 2 ;;
  esac
done

APT_PACKAGES=(
  ffmpeg                      # the SRT relay and the tests' encoders (PyAV has its own FFmpeg libraries)
  fonts-dejavu-core           # the burn-in sink's default TrueType font
  fontconfig fonts-noto-cjk fonts-noto-color-emoji   # burn-in font fallback: CJK and emoji glyphs (fc-match picks them)
  libgl1 libglib2.0-0         # opencv-python's shared libraries (the opencv: source)
  python3-venv                # `python3 -m venv` with Debian's/Ubuntu's python3
)
TEST_APT_PACKAGES=(           # the real servers the tests run (tests/servers.py, docs/install.md)
  nginx libnginx-mod-rtmp     # RTMP server
  chromium                    # headless browser for the overlay tests
  ngircd                      # IRC server for the Twitch sink tests
  obs-studio xvfb             # the OBS sink's test against real OBS (headless under Xvfb)
  python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav   # RTSP server (a /usr/bin/python3 process)
)
packages=("${APT_PACKAGES[@]}")
[ "$TEST" = 1 ] && packages+=("${TEST_APT_PACKAGES[@]}")

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  missing=()
  for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "install.sh: no apt-get here; install ffmpeg and a TrueType font yourself" \
       "(for the tests also nginx with the RTMP module, chromium, ngircd, GStreamer's RTSP server)" >&2
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
  echo "install.sh: into the active virtual environment $VENV" >&2
else
  VENV="${LIVECC_VENV:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "install.sh: creating the virtual environment $VENV (${PYTHON:-python3} -m venv)" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if [ -n "${LIVECC_TORCH_INDEX:-}" ]; then
  pip_install torch --index-url "$LIVECC_TORCH_INDEX"   # e.g. CPU-only wheels: no CUDA libraries
fi
extras="${LIVECC_EXTRAS:-}"
[ "$TEST" = 1 ] && extras="test,cluster${extras:+,$extras}"  # cluster: Ray, for tests/test_cluster.py
pip_install -e ".${extras:+[$extras]}"

version=$("$PY" -c 'import pipeline; print(pipeline.__version__)')
if [ -n "${VIRTUAL_ENV:-}" ]; then
  echo "livecc-pipeline $version installed: livecc demo"
else
  echo "livecc-pipeline $version installed in $VENV: run $VENV/bin/livecc demo, or first . $VENV/bin/activate"
fi
