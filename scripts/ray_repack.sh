#!/usr/bin/env bash
# Ray for a machine that can only receive 64 MiB (the lent GPU machines: docs/cluster.md). The Ray wheel (79 MB)
# is unpacked without what livecc does not use (Java jars, RLlib, Tune, Train, Data, LLM, Serve, caches) and
# packed as one xz tarball with the wheels of Ray's own dependencies; on the other machine it is unpacked into a
# folder put on PYTHONPATH, with only the dependencies that machine lacks.
#
#   bash scripts/ray_repack.sh pack [OUT.tar.xz]          # here (needs PyPI): default .whl/ray-repack.tar.xz
#   bash scripts/ray_repack.sh unpack IN.tar.xz DIR       # there; then: export PYTHONPATH=DIR:$PYTHONPATH
#                                                         #         and PATH=DIR/bin:$PATH (the ray command)
# PY_VERSION (default: this python's, e.g. 3.11) picks the wheel for the other machine's Python.
# PRESENT: the distributions that machine has already (default: those of the lent GPU machines' image, from the
# workplace's package list), whose wheels are left out of the tarball; PRESENT= keeps every dependency.
# The ELF files (raylet, gcs_server, _raylet.so, ...) are stripped of their symbol tables when `strip` exists.
set -euo pipefail
PY=${PYTHON:-python3}
cmd=${1:?pack or unpack}

extract() {  # a wheel into a folder, keeping the files' modes (python -m zipfile drops them: raylet, gcs_server)
  $PY - "$1" "$2" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        mode = (info.external_attr >> 16) & 0o777
        if mode:
            os.chmod(path, mode)
PY
}

if [ "$cmd" = pack ]; then
  out=$(realpath -m "${2:-.whl/ray-repack.tar.xz}")
  pyver=${PY_VERSION:-$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
  version=${RAY_VERSION:-$($PY -c 'import ray; print(ray.__version__)' 2>/dev/null || echo 2.60.0)}
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # the wheel and its dependencies' wheels, for that Python on x86-64 Linux
  $PY -m pip download -q --only-binary=:all: --platform manylinux2014_x86_64 --python-version "$pyver" \
      -d "$work/wheels" "ray==$version"
  mkdir -p "$work/pack/ray" "$work/pack/deps"
  extract "$work"/wheels/ray-*.whl "$work/pack/ray"
  rm "$work"/wheels/ray-*.whl
  present=" ${PRESENT-attrs certifi charset-normalizer charset_normalizer click filelock idna msgpack packaging protobuf pyyaml PyYAML requests typing-extensions typing_extensions urllib3} "
  for whl in "$work"/wheels/*.whl; do
    dist=$(basename "$whl" | cut -d- -f1)
    case "$present" in *" $dist "*) ;; *) mv "$whl" "$work/pack/deps/" ;; esac
  done
  r="$work/pack/ray/ray"
  rm -rf "$r/jars" "$r/rllib" "$r/tune" "$r/train" "$r/data" "$r/llm" "$r/serve" "$r/air" "$r/workflow" \
         "$r/util/dask" "$r/util/spark" "$r/util/joblib" "$r/dashboard/client/build"  # the web UI: tolerated
  if command -v strip >/dev/null; then  # symbols only: raylet 35 -> 23 MB, gcs_server and _raylet.so alike
    find "$work/pack" -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) -print0 |
      while IFS= read -r -d '' f; do
        if [ "$(head -c4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ]; then strip --strip-unneeded "$f"; fi
      done
  fi
  find "$work/pack" -name __pycache__ -prune -exec rm -rf {} +
  # the ray command: a console script calling ray.scripts.scripts:main
  mkdir -p "$work/pack/ray/bin"
  printf '#!/usr/bin/env python3\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' \
      > "$work/pack/ray/bin/ray"
  chmod +x "$work/pack/ray/bin/ray"
  mkdir -p "$(dirname "$out")"
  tar -C "$work/pack" -cf - . | xz -6 -T0 > "$out"
  echo "$out: $(du -m "$out" | cut -f1) MiB (ray $version, Python $pyver; deps: $(ls "$work/pack/deps" | tr '\n' ' '))"
elif [ "$cmd" = unpack ]; then
  in=${2:?the tarball}; dir=$(realpath -m "${3:?the target folder}")
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  if command -v xz >/dev/null; then
    xz -dc "$in" | tar -C "$work" -xf -
  else  # Python's lzma: the same, without xz-utils
    $PY -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$in" "$work"
  fi
  mkdir -p "$dir"
  cp -a "$work/ray/." "$dir/"
  for whl in "$work"/deps/*.whl; do  # only the distributions this machine lacks
    dist=$(basename "$whl" | cut -d- -f1)
    if ! $PY -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
      extract "$whl" "$dir"
      echo "added $dist"
    fi
  done
  PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" $PY -c 'import ray; print("ray", ray.__version__, "from", ray.__file__)'
else
  echo "usage: $0 pack [OUT] | unpack IN DIR" >&2
  exit 2
fi
