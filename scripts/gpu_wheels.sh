#!/usr/bin/env bash
# Fill .whl/ and .gpucache/ for scripts/gpu_check.sh on an offline GPU machine (run this on a networked CPU machine).
#
#   scripts/gpu_wheels.sh            # cp312 manylinux x86-64 wheels (the GPU machine's Python 3.12)
#
# .whl/: the packages the GPU machine lacks (megatron-core, omegaconf, antlr4 runtime, msgspec, pyzmq, math-verify,
# latex2sympy2_extended, jsonschema + jsonschema-specifications + referencing + rpds-py, ray), at the versions of
# this machine's venv, downloaded with `pip download --no-deps --only-binary=:all:` for the target platform. Ray's
# wheel (79 MB) does not fit the 64 MiB transfer, so it goes as ray-<v>-stripped.tar.xz: the wheel's files without
# ray/jars (Java workers, 32 MB compressed), the dashboard's web front end (ray/dashboard/client) and ray/rllib, none
# of which `ray.init(include_dashboard=False)` with Python actors touches, recompressed with xz; gpu_check.sh
# extracts it next to the installed wheels.
# .gpucache/: the warm-start cache entry of configs/tiny-cpu.yaml (pipeline/warmstart.py, $DAPO_CACHE_DIR), made
# here first if missing (~2 min on CPU), so that the GPU machine's short `dapo train` does not train it again.
# Prints the total size; the lead carries .whl and .gpucache (git-ignored) with the working tree.
#
# Environment: PY (python with pip and the project's venv; default .venv/bin/python, else /work/main/.venv/bin/python),
# PYVER (target Python, default 3.12), WHL_DIR (default .whl), CACHE_DIR (default .gpucache).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PY:-}
if [[ -z $PY ]]; then
    for c in "$REPO/.venv/bin/python" /work/main/.venv/bin/python python3; do
        if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
    done
fi
PYVER=${PYVER:-3.12}
TAG=cp${PYVER/./}
WHL_DIR=${WHL_DIR:-$REPO/.whl}
CACHE_DIR=${CACHE_DIR:-$REPO/.gpucache}
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_26_x86_64 manylinux_2_28_x86_64)
PACKAGES=(megatron-core omegaconf antlr4-python3-runtime msgspec pyzmq math-verify latex2sympy2_extended jsonschema
    jsonschema-specifications referencing rpds-py)
RAY_DROP=(ray/jars ray/dashboard/client ray/rllib)

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

mkdir -p "$WHL_DIR"
rm -f "$WHL_DIR"/*.whl "$WHL_DIR"/ray*.tar.xz "$WHL_DIR"/ray*.part-*
specs=()
for p in "${PACKAGES[@]}"; do specs+=("$p==$(version "$p")"); done
plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done
dl=(-m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat_args[@]}")
echo "[wheels] ${specs[*]} (Python $PYVER)"
"$PY" "${dl[@]}" -d "$WHL_DIR" "${specs[@]}"

RAY_V=$(version ray)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[wheels] ray==$RAY_V: download, strip ${RAY_DROP[*]}, recompress with xz"
"$PY" "${dl[@]}" -d "$tmp" "ray==$RAY_V"
# Extract keeping the executable bits (raylet, gcs_server, ...) that pip would set from the zip's attributes.
"$PY" - "$tmp"/ray-*.whl "$tmp/x" <<'PYEOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        if (info.external_attr >> 16) & 0o111:
            os.chmod(path, 0o755)
PYEOF
for d in "${RAY_DROP[@]}"; do rm -rf "${tmp:?}/x/$d"; done
XZ_OPT=${XZ_OPT:--6 -T0} tar -C "$tmp/x" -cJf "$WHL_DIR/ray-$RAY_V-$TAG-stripped.tar.xz" .

# The warm-start entry of the tiny config, made here if this machine has none yet.
key=$(PYTHONPATH=$REPO "$PY" -c "
from pipeline.config import load_config
from pipeline.warmstart import cached_warm_start, cache_root, warm_start_key
cfg = load_config('configs/tiny-cpu.yaml', [])
cached_warm_start(cfg)
print(warm_start_key(cfg))" | tail -1)
src=$(PYTHONPATH=$REPO "$PY" -c "from pipeline.warmstart import cache_root; print(cache_root())")
rm -rf "$CACHE_DIR"
mkdir -p "$CACHE_DIR/warmstart"
cp -r "$src/$key" "$CACHE_DIR/warmstart/$key"
echo "[wheels] warm-start entry $key -> $CACHE_DIR/warmstart/$key"

ls -l "$WHL_DIR"
total=$(du -cb "$WHL_DIR" "$CACHE_DIR" | tail -1 | cut -f1)
echo "[wheels] total: $total bytes ($((total / 1048576)) MiB) in $WHL_DIR and $CACHE_DIR" \
    "(transfer limit: 64 MiB with the repo)"
