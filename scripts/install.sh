#!/usr/bin/env bash
# Installs livecc-pipeline and everything its tests use: system packages (Debian/Ubuntu) + this package.
#   bash scripts/install.sh            # CPU install + test tools
#   LIVECC_EXTRAS=gpu bash scripts/install.sh   # also flash-attn / liger-kernel (needs CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  ffmpeg                      # encoders/decoders, ffprobe, the SRT relay
  nginx libnginx-mod-rtmp     # RTMP server for tests and local restreaming
  chromium                    # headless browser for the overlay tests
  ngircd                      # IRC server for the Twitch sink tests
  fonts-dejavu-core           # the burn-in sink's default TrueType font
  fontconfig fonts-noto-cjk fonts-noto-color-emoji   # burn-in font fallback: CJK and emoji glyphs (fc-match picks them)
  obs-studio xvfb             # the OBS sink's test against real OBS (headless under Xvfb)
  libgl1 libglib2.0-0         # opencv-python (the opencv: source, plugins/sources/opencv.py)
  python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav   # RTSP server for tests
)

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "install.sh: no apt-get here; install ffmpeg (and, for the tests, nginx-rtmp, chromium, ngircd) yourself" >&2
fi

PY=${PYTHON:-python3}
extras="test,cluster${LIVECC_EXTRAS:+,$LIVECC_EXTRAS}"  # cluster: Ray, for tests/test_cluster.py
$PY -m pip install -q --disable-pip-version-check -e ".[${extras}]"
echo "livecc-pipeline installed: $($PY -c 'import pipeline; print(pipeline.__version__)')"
