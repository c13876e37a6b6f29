#!/usr/bin/env bash
# The GPU checks still open, as prepared device calls (each well inside the 600 s a call may run).
#
# Here, where pip can download (once per checkout; .whl/ is git-ignored through .git/info/exclude):
#   bash benchmarks/device_checks.sh prepare
# Then on the device machine, three calls, each with carry [".whl"]:
#   bash benchmarks/device_checks.sh engine      # tiny model on CUDA: compiled steps, answers, GPU metrics
#   bash benchmarks/device_checks.sh study       # the 7B figures of benchmarks/gpu_study.py
#   bash benchmarks/device_checks.sh training    # fine-tuning a 0.5B-shaped checkpoint, full and LoRA
# Everything printed is also written to $OUT/<check>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

# what the device image (Python 3.12, torch, transformers 5.17) lacks for this project's code
WHEELS="transformers==5.24.0 pydicom==3.0.2 sqlalchemy==2.1.9 pydantic==2.14.4 pydantic-core==2.50.5
        typing-inspection==0.4.5 annotated-types==0.8.0"

check="${1:?prepare, engine, study or training}"
if [ "$check" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    du -sh .whl
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log="${OUT:-/tmp}/$check.txt"
case "$check" in
    engine) python3 benchmarks/device_checks.py engine 2>&1 | tee "$log" ;;
    training) python3 benchmarks/device_checks.py training --samples 64 2>&1 | tee "$log" ;;
    study) python3 benchmarks/gpu_study.py --repeats 10 --baseline-repeats 2 --queued 64 --concurrency 8 2>&1 \
               | tee "$log" ;;
    *) echo "unknown check $check" >&2; exit 2 ;;
esac
