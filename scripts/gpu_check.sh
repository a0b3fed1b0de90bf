#!/usr/bin/env bash
# One-call check of the trainer on a fresh, offline GPU machine (issue 16). Run from the repo root:
#
#   OUT=/path/to/out bash scripts/gpu_check.sh            # default OUT: ./gpu-out
#   bash scripts/gpu_check.sh --dry-run                   # CPU machine: tiny shape, no GPU placement, same steps
#
# Brings: .whl/ and .gpucache/ made by scripts/gpu_wheels.sh (git-ignored: carry them with the working tree; other
# places: WHL_DIR, GPU_CACHE_DIR).
# Never touches the machine's torch: the wheels go to $GPU_SITE (default /tmp/site) with pip --no-index --no-deps
# --target, and PYTHONPATH=$GPU_SITE:$REPO.
#
# Parts, most valuable first, each under its own `timeout` inside one overall budget (GPU_CHECK_BUDGET seconds,
# default 440, so the whole call stays under 8 minutes; with less, the bench gets what leaves 150 s for the last two
# parts, BENCH_STEPS=2 shortens it), logs in $OUT/<part>.log:
#   setup   install the wheels (split parts .whl/*.part-* are joined first; ray-*-stripped.tar.xz is extracted), check
#           the imports, record nvidia-smi.
#   bench   python -m benchmarks.bench_trainer --shape 1.5b (BENCH_SHAPE) --backends megatron,fsdp: tokens/s, MFU,
#           peak memory, logprob forward ($OUT/bench.json).
#   pytest  python -m pytest -m gpu -q (2-GPU tests skip on one GPU), concurrently with:
#   train   python -m pipeline.tools.cli train configs/tiny-cpu.yaml with the trainer on the GPU (trainer.gpus_per_rank=1),
#           the CPU engine, gloo weight sync, the carried warm-start cache (DAPO_CACHE_DIR=.gpucache),
#           trainer.total_steps=4, eval off; passes when it exits 0 having printed `step 4/4`. nvidia-smi is sampled
#           meanwhile, to show that a process of the run held GPU memory.
# The summary table ($OUT/summary.txt) is printed last. Exit status: 0 when every part passed.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
SITE=${GPU_SITE:-/tmp/site}
WHL_DIR=${WHL_DIR:-$REPO/.whl}
CACHE_DIR=${GPU_CACHE_DIR:-$REPO/.gpucache}
BUDGET=${GPU_CHECK_BUDGET:-440}
STEPS=${TRAIN_STEPS:-4}
if ((DRY)); then
    SHAPE=${BENCH_SHAPE:-tiny}
    TRAIN_GPU=()
else
    SHAPE=${BENCH_SHAPE:-1.5b}
    TRAIN_GPU=(trainer.gpus_per_rank=1)
fi
START=$SECONDS
declare -A RC SECS PIDS T0 NOTE

remaining() { echo $((BUDGET - (SECONDS - START))); }

# limit WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for the parts after this one (at least 20).
limit() {
    local r=$(($(remaining) - $2))
    ((r < $1)) && set -- "$r"
    ((${1} < 20)) && set -- 20
    echo "$1"
}

# start NAME SECONDS CMD...: run CMD in its own session (so its leftovers can be found) under timeout, in background.
start() {
    local name=$1 secs=$2
    shift 2
    echo "[gpu_check] $(date -u +%T) $name: start (limit ${secs}s): $*"
    setsid -w timeout -k 10 "$secs" "$@" >"$OUT/$name.log" 2>&1 &
    PIDS[$name]=$!
    T0[$name]=$SECONDS
}

# finish NAME: wait for it, then kill what its session left behind (spawned workers, Ray's processes).
finish() {
    local name=$1
    wait "${PIDS[$name]}"
    RC[$name]=$?
    SECS[$name]=$((SECONDS - T0[$name]))
    pkill -KILL -s "${PIDS[$name]}" 2>/dev/null
    echo "[gpu_check] $(date -u +%T) $name: rc ${RC[$name]} in ${SECS[$name]}s"
    if ((RC[$name] != 0)); then tail -n 15 "$OUT/$name.log" | sed "s/^/[$name] /"; fi
}

# ------------------------------------------------------------------ setup: wheels, imports, device
setup() {
    set -e
    mkdir -p "$SITE"
    local joined=/tmp/gpu_check_joined wheels=() f base
    rm -rf "$joined" && mkdir -p "$joined"
    shopt -s nullglob
    for f in "$WHL_DIR"/*.part-aa "$WHL_DIR"/*.part-00; do  # split -b N FILE FILE.part- : join FILE.part-* in order
        base=$(basename "${f%.part-*}")
        cat "${f%.part-*}".part-* >"$joined/$base"
    done
    for f in "$WHL_DIR"/*.whl "$joined"/*.whl; do wheels+=("$f"); done
    if ((DRY)); then # the wheels are built for the GPU machine's Python: list them, check the imports of this one
        echo "dry run: would install ${#wheels[@]} wheels into $SITE: ${wheels[*]##*/}"
        wheels=()
    fi
    echo "installing ${#wheels[@]} wheels into $SITE"
    if ((${#wheels[@]})); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "${wheels[@]}"
    fi
    for f in "$WHL_DIR"/*.tar.xz "$joined"/*.tar.xz; do
        ((DRY)) && echo "dry run: would extract $f" && continue
        echo "extracting $f into $SITE"
        # Python's tarfile (lzma) rather than tar -J: a minimal machine may have no xz binary.
        "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' "$f" "$SITE"
    done
    rm -rf "$joined"
    "$PY" - <<'PYEOF'
import importlib, torch
for m in ("megatron.core", "omegaconf", "msgspec", "zmq", "math_verify", "ray", "transformers", "pipeline.tools.cli"):
    mod = importlib.import_module(m)
    print(f"import {m}: ok {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
    nvidia-smi || true
}

export PYTHONPATH=$SITE:$REPO
export DAPO_CACHE_DIR=$CACHE_DIR # the carried warm-start cache (pipeline/warmstart.py)
export PYTHONUNBUFFERED=1
echo "[gpu_check] $(date -u +%T) repo $REPO, out $OUT, budget ${BUDGET}s, dry-run $DRY, python $($PY -V 2>&1)"
git -C "$REPO" log --oneline -1 2>/dev/null | sed 's/^/[gpu_check] commit /'

T0[setup]=$SECONDS
(setup) >"$OUT/setup.log" 2>&1
RC[setup]=$?
SECS[setup]=$((SECONDS - T0[setup]))
echo "[gpu_check] $(date -u +%T) setup: rc ${RC[setup]} in ${SECS[setup]}s"
((RC[setup] != 0)) && tail -n 15 "$OUT/setup.log" | sed 's/^/[setup] /'

# ------------------------------------------------------------------ bench (alone on the GPU: its timings)
secs=$(limit 260 150)
start bench "$secs" "$PY" -m benchmarks.bench_trainer --shape "$SHAPE" --backends megatron,fsdp \
    --steps "${BENCH_STEPS:-3}" --json "$OUT/bench.json" --timeout-s $(((secs - 40) / 2))
finish bench

# ------------------------------------------------------------------ pytest -m gpu and a short train, side by side
secs=$(limit 180 0)
start pytest "$secs" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
start train "$secs" "$PY" -m pipeline.tools.cli train configs/tiny-cpu.yaml "${TRAIN_GPU[@]}" weight_sync.backend=gloo \
    trainer.total_steps="$STEPS" eval.every=0 checkpoint.every=0 logging.tensorboard=false \
    logging.dir="$OUT/train-runs" logging.run_name=gpu-check
if command -v nvidia-smi >/dev/null && ((!DRY)); then # GPU memory held by processes while the parts run
    # One line per GPU process: "MiB session command"; the run's are in the train part's session or Ray workers.
    (while kill -0 "${PIDS[train]}" 2>/dev/null; do
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
            while IFS=', ' read -r pid mib; do echo "$mib $(ps -o sess=,args= -p "$pid" 2>/dev/null)"; done
        sleep 2
    done) >"$OUT/train-gpu-usage.log" 2>&1 &
fi
finish pytest
finish train

# ------------------------------------------------------------------ summary
{
    echo "| part | result | seconds | figures |"
    echo "|---|---|---|---|"
    s=$([[ ${RC[setup]} == 0 ]] && echo pass || echo FAIL)
    echo "| setup | $s | ${SECS[setup]} | $(grep -c '^import .*: ok' "$OUT/setup.log") imports ok;" \
        "$(grep -m1 '^torch ' "$OUT/setup.log") |"
    s=$([[ ${RC[bench]} == 0 ]] && echo pass || echo "FAIL rc ${RC[bench]}")
    figs=$("$PY" - "$OUT/bench.json" <<'PYEOF' 2>/dev/null || echo "no bench.json"
import json, sys
r = json.load(open(sys.argv[1]))
parts = [f"{r['shape']} {r['tokens']} tokens"]
for b in ("megatron", "fsdp"):
    if f"{b}_error" in r:
        parts.append(f"{b}: failed")
        continue
    mfu = r.get(f"{b}_mfu")
    parts.append(f"{b}: {r[f'{b}_train_tokens_per_s']:.0f} tok/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
                 f"peak {r[f'{b}_peak_mem_gib']:.1f} GiB, logprob {r[f'{b}_logprob_tokens_per_s']:.0f} tok/s "
                 f"({r[f'{b}_logprob_over_train_ratio']:.2f}x), loss {r[f'{b}_first_loss']:.5f}")
print("; ".join(parts))
PYEOF
)
    echo "| bench | $s | ${SECS[bench]} | $figs |"
    s=$([[ ${RC[pytest]} == 0 ]] && echo pass || echo "FAIL rc ${RC[pytest]}")
    counts=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$OUT/pytest.log" | tail -1)
    echo "| pytest -m gpu | $s | ${SECS[pytest]} | $counts |"
    last=$(grep -oE "^step +[0-9]+/[0-9]+" "$OUT/train.log" | tail -1)
    reached=$(grep -cE "^step +$STEPS/$STEPS " "$OUT/train.log")
    s=$([[ ${RC[train]} == 0 && $reached -ge 1 ]] && echo pass || echo "FAIL rc ${RC[train]}")
    gpu_mem=$(awk -v sid="${PIDS[train]}" '($2 == sid || /ray::/) && $1 + 0 > m {m = $1 + 0} END {print m + 0}' \
        "$OUT/train-gpu-usage.log" 2>/dev/null)
    echo "| train (tiny, trainer on GPU) | $s | ${SECS[train]} | last '${last:-none}' of $STEPS;" \
        "GPU memory of the run's processes max ${gpu_mem:-n/a} MiB |"
    echo "total $((SECONDS - START))s of budget ${BUDGET}s; logs in $OUT"
} >"$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
[[ ${RC[setup]} == 0 && ${RC[bench]} == 0 && ${RC[pytest]} == 0 ]] && grep -q "| train .* | pass |" "$OUT/summary.txt"
