#!/usr/bin/env bash
# What a lent GPU machine needs beside the repo, packed small enough to travel (64 MiB with the working tree).
#
# Wheels are zip (deflate) files: PyAV's 36 MB wheel, installed and packed with xz, is ~24 MB. So the wheels of
# WHEELS (default .whl) are installed here into a tree for the other machine's Python (PY_VERSION, default 3.12;
# x86-64 manylinux; no dependencies resolved: name every wheel) and packed as OUT/site.tar.xz, and the folder
# BENCH (default .bench: the tokenizer of the benchmarks) as OUT/bench.tar.xz. With the Ray repack
# (scripts/ray_repack.sh pack OUT/ray-repack.tar.xz) one folder, OUT, is all that is carried:
#
#   bash scripts/carry_pack.sh [OUT]                      # here: default .ray
#   # there (carry [OUT]):
#   mkdir -p /tmp/site && xz -dc OUT/site.tar.xz | tar -C /tmp/site -xf - && xz -dc OUT/bench.tar.xz | tar -xf -
#   export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
PY=${PYTHON:-python3}
out=$(realpath -m "${1:-.ray}")
wheels=${WHEELS:-.whl}
bench=${BENCH:-.bench}
pyver=${PY_VERSION:-3.12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
plats=()
for n in 17 24 27 28 31 34 35; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
$PY -m pip install -q --no-deps --no-index --no-compile --target "$work/site" --implementation cp \
    --python-version "$pyver" --only-binary=:all: "${plats[@]}" --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 "$wheels"/*.whl
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -9 -T0 > "$out/site.tar.xz"
echo "$out/site.tar.xz: $(du -m "$out/site.tar.xz" | cut -f1) MiB ($(ls "$wheels" | tr '\n' ' '))"
if [ -d "$bench" ]; then
  tar -C "$(dirname "$bench")" -cf - "$(basename "$bench")" | xz -9 -T0 > "$out/bench.tar.xz"
  echo "$out/bench.tar.xz: $(du -k "$out/bench.tar.xz" | cut -f1) KiB"
fi
