#!/usr/bin/env bash
# The whole GPU verification on one GPU in one command, in at most 8 minutes; prints one
# JSON line (bench "gpu_check"):
#   1. the `gpu` tests (tests/test_gpu.py: bf16 ZeRO-2/3 pretraining with DistilBERT- and
#      MiniLMv2-style objectives, SIGTERM + resume with the CUDA RNG, the NaN skip, NCCL's
#      device rules in a world of one with collectives forced, fine-tuning on CUDA, latency
#      with bf16 weights);
#   2. bench/train_throughput.py at the real shape (12 x 768 teacher, 6 x 384 student,
#      seq 128, bf16, ZeRO-2) against a bare PyTorch loop in the same run: samples/s, the
#      ratio (target >= 0.9) and MFU (target >= 40% of the card's bf16 peak);
#   3. bench/loader_throughput.py on that machine's CPU (target >= 10,000 sequences/s per
#      loader worker).
#
# The GPU machine may have no network and a preinstalled Python with a CUDA torch and
# transformers but no DeepSpeed or OmegaConf: the script installs the wheels carried
# beside it in .whl/ (git-ignored) with --no-index. Build them on a machine with network:
#     bench/gpu_check.sh --build-wheels     (the tree, wheels included, stays < 64 MiB)
#
# Usage: bench/gpu_check.sh [--dry-run] [--cpu] [--build-wheels] [--out DIR]
#   --dry-run   print the steps, run nothing
#   --cpu       the CPU-safe parts here: the gpu tests are collected and skip with their
#               reason, the throughput run uses a small CPU configuration
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY=0 CPU=0 BUILD=0 OUT_DIR=${OUT:-$(mktemp -d -t gpu-check-XXXX)}
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --cpu) CPU=1 ;;
        --build-wheels) BUILD=1 ;;
        --out) OUT_DIR=$2; shift ;;
        *) echo "gpu_check: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
[[ -x .venv/bin/python && $CPU == 1 ]] && PY=.venv/bin/python

# Wheels for what the GPU image lacks (its Python is 3.12): pinned like requirements/.
# The versions of requirements/constraints.txt.
pin() { grep -i -m1 "^$1==" requirements/constraints.txt; }
WHEELS=($(pin deepspeed) $(pin hjson) $(pin omegaconf) $(pin pydantic) $(pin pydantic_core)
        $(pin annotated-types) $(pin typing-inspection) $(pin typing_extensions))

exec 3>&2  # the steps are shown on the terminal even when their output goes to a log
run() {  # print, and run unless --dry-run
    echo "+ $*" >&3
    [[ $DRY == 1 ]] || "$@"
}

if [[ $BUILD == 1 ]]; then
    mkdir -p .whl
    pip=(.venv/bin/python -m pip)
    # DeepSpeed is a source distribution (pure Python, ops compiled on first use): built
    # into a wheel here; the others as published, for CPython 3.12 on x86-64
    run "${pip[@]}" wheel -q --no-deps -w .whl "${WHEELS[0]}"
    run "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]:1}"
    run du -sh .whl
    exit 0
fi

start=$(date +%s)
mkdir -p "$OUT_DIR"
if [[ $CPU == 0 ]]; then
    if [[ $DRY == 0 ]] && ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check: no wheels in .whl/; run bench/gpu_check.sh --build-wheels on a" \
             "machine with network first" >&2
        exit 2
    fi
    run $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-check-site .whl/*.whl
    export PYTHONPATH=/tmp/gpu-check-site:$REPO
    unset DS_ACCELERATOR
    train_args=(--device cuda --shape real)
    loader_args=()
else
    export PYTHONPATH=$REPO DS_ACCELERATOR=cpu
    train_args=(--device cpu --shape real --steps 8 --batch 4)
    loader_args=(--batches 30)
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

run timeout 330 $PY -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py \
    --junitxml "$OUT_DIR/gpu_tests.xml" >"$OUT_DIR/gpu_tests.log" 2>&1 || true
run timeout 180 $PY bench/train_throughput.py "${train_args[@]}" \
    >"$OUT_DIR/train_throughput.jsonl" 2>"$OUT_DIR/train_throughput.log" || true
run timeout 60 $PY bench/loader_throughput.py "${loader_args[@]}" \
    >"$OUT_DIR/loader_throughput.jsonl" 2>"$OUT_DIR/loader_throughput.log" || true
[[ $DRY == 1 ]] && exit 0

$PY - "$OUT_DIR" "$(( $(date +%s) - start ))" "$CPU" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, seconds, cpu = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

def last_json(name):
    try:
        lines = [l for l in (out / name).read_text().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else {"error": f"no result, see {out / name}"}
    except OSError as err:
        return {"error": str(err)}

tests = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
try:
    for case in ET.parse(out / "gpu_tests.xml").getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            tests["failed"] += 1
            tests["failures"].append(case.get("name"))
        elif "skipped" in kinds:
            tests["skipped"] += 1
        else:
            tests["passed"] += 1
except (OSError, ET.ParseError) as err:
    tests["error"] = f"{err}; see {out / 'gpu_tests.log'}"
train, loader = last_json("train_throughput.jsonl"), last_json("loader_throughput.jsonl")
targets = {"tests": tests["failed"] == 0 and tests["passed"] > 0,
           "ratio": train.get("ratio", 0) >= 0.9, "mfu": train.get("mfu", 0) >= 0.4,
           "loader": loader.get("slowest_seq_per_s", 0) >= 10_000}
print(json.dumps({"bench": "gpu_check", "mode": "cpu" if cpu else "gpu",
                  "gpu": train.get("gpu"), "seconds": seconds, "tests": tests,
                  "train_throughput": train, "loader_throughput": loader,
                  "targets_met": targets, "logs": str(out)}))
EOF
