#!/usr/bin/env bash
# The GPU checks still open, as prepared device calls (each well inside the 600 s a call may run).
#
# Here, where pip can download (once per checkout; .whl/ is git-ignored through .git/info/exclude):
#   bash benchmarks/device_checks.sh prepare
# Then on the device machine, one call each, with carry [".whl"]:
#   bash benchmarks/device_checks.sh engine      # tiny model on CUDA: compiled step, reads, answers, GPU metrics
#   bash benchmarks/device_checks.sh study       # the 7B figures of benchmarks/gpu_study.py (about 6 minutes on a
#                                                # fresh H100, installs and compilation included)
#   bash benchmarks/device_checks.sh training    # fine-tuning a 0.5B-shaped checkpoint, full and LoRA
# Arguments after the check go to its script: `study --tiny` (or `engine --tiny`) is the dry run on a CPU,
# the same script and output; give it the interpreter that has the project's packages:
#   PYTHON=.venv/bin/python bash benchmarks/device_checks.sh study --tiny
# Everything printed is also written to $OUT/<check>.txt; gpu_study.py writes each figure to
# $OUT/study-figures.jsonl the moment it is measured, so a run cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."

# what the device image (Python 3.12, torch, transformers 5.17) lacks for this project's code
WHEELS="transformers==5.24.0 pydicom==3.0.2 sqlalchemy==2.1.9 pydantic==2.14.4 pydantic-core==2.50.5
        typing-inspection==0.4.5 annotated-types==0.8.0"
PYTHON="${PYTHON:-python3}"

check="${1:?prepare, engine, study or training}"
shift
if [ "$check" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    du -sh .whl
    exit 0
fi

# the wheels are for the device image's Python 3.12: another interpreter (a CPU dry run) has its own packages
if [ -d .whl ] && "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
log="${OUT:-/tmp}/$check.txt"
case "$check" in
    engine) "$PYTHON" benchmarks/device_checks.py engine "$@" 2>&1 | tee "$log" ;;
    training) "$PYTHON" benchmarks/device_checks.py training --samples 64 "$@" 2>&1 | tee "$log" ;;
    study) "$PYTHON" benchmarks/gpu_study.py --repeats 3 --baseline-repeats 1 --queued 16 --concurrency 8 "$@" \
               2>&1 | tee "$log" ;;
    *) echo "unknown check $check" >&2; exit 2 ;;
esac
