#!/usr/bin/env bash
# The GPU rows of README's Performance section and a check of digitrec's CUDA paths (eager, bfloat16, compiled,
# graphed), on a machine with a CUDA GPU and PyTorch, with or without digitrec installed.
#
#   DIGITREC_DATA=/path/to/mnist-gz-files bash benchmarks/gpu_check.sh     # run from the repository root
#
# Logs go to $OUT (default gpu-results/). Each step has its own time limit, and a failing step does not stop
# the others; the exit status counts the failed steps. STEPS="data bench_gpu" runs only the steps named.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # make setup's, where there is one
failed=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND, its output to the terminal and to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $name "* ]] || return 0
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}

step device 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
    $py -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
step data 120 "$py" -m digitrec data
# fast, every step one replayed CUDA graph, against the same steps launched eagerly: 5 seeds each, twice
step bench_gpu 120 "$py" -m digitrec bench gpu --recipe fast --seeds 5
step bench_gpu_json 120 "$py" -m digitrec bench gpu --recipe fast --seeds 5 --json
# the ordinary training loop on the GPU, eager and under torch.compile
step train_fast 120 "$py" -m digitrec train --recipe fast --device cuda --out "$out/run-fast" --overwrite
step train_fast_compiled 240 "$py" -m digitrec train --recipe fast --device cuda --compile --out "$out/run-fast-compiled" --overwrite
# recipes side by side, seconds to 99% (the GPU is what auto picks)
step bench_train 300 "$py" -m digitrec bench train --recipes fast,default,seed-cnn-bn
# the graphed step against the eager one, and two runs of one seed on the GPU bit for bit (cuDNN deterministic)
step pytest 180 "$py" -m pytest -q -p no:cacheprovider tests/test_graphed.py "tests/test_train.py::test_same_seed_same_weights"
echo "failed steps: $failed"
exit "$failed"
