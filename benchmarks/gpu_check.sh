#!/usr/bin/env bash
# One-shot check of fastlora on a machine with an NVIDIA GPU and no network :
#   1. install this checkout in place (no dependencies, no build isolation: nothing is downloaded);
#   2. print nvidia-smi, torch, triton, peft versions and the backend fastlora picks on CUDA;
#   3. run the full test suite (on CUDA: the kernels, bf16, large shapes) within a time budget;
#   4. run the quick GPU benchmark of issue 3's goal grid: bf16, r=16, K=N ∈ {4096, 5120, 8192} ×
#      M ∈ {2048, 4096, 8192}, dropout 0 and 0.1, forward and forward+backward, fastlora vs PEFT's math, the
#      seed's W+BA (naive) and the frozen nn.Linear (base); it prints the table and the geometric means that
#      issue 3's goals are stated in, MET / MISSED against each goal;
#   5. time inference at decode shapes (M ∈ {1, 16, 64}, K = N = 4096) against the same peers;
#   6. time fastlora with FASTLORA_BASE_GEMM=cublas (the two large GEMMs on cuBLAS, the LoRA terms in Triton)
#      against the frozen linear on a slice of the grid: the default (auto: per problem, the faster of the fused
#      Triton GEMM and this composition, timed on first use) must not be slower than it beyond noise;
#   7. print which composition the dispatch chose for each shape of the grid and decode, with both times
#      (benchmarks/dispatch_report.py), and the first-run compile + autotune + dispatch time per problem;
#   8. QLoRA (benchmarks/qlora_check.py, if bitsandbytes imports): fastlora vs PEFT's QLoRA layer vs bnb's
#      dequantize + matmul, time and peak memory, each Triton path forced, outputs and gradients checked;
#   9. DoRA (benchmarks/dora_check.py): fastlora's DoRA step vs fastlora's LoRA step (goal: within 1.2x) and PEFT's
#      DoRA, with PEFT's DoRA/LoRA ratio measured in the same run;
#  10. MoE (python -m fastlora bench --moe auto): the MoE blocks of Qwen3-30B-A3B, Mixtral-8x7B and GPT-OSS-20B
#      (bf16, LoRA r=16 on the experts' gate_up_proj and down_proj) forward + backward, fastlora vs PEFT's
#      target_parameters path vs the frozen block; goals: <= 1.15x the frozen block, >= 3x faster than PEFT.
#  11. mixed-adapter batches (benchmarks/mixed_check.py): PEFT's adapter_names= on a 4096x4096 layer, prefill (4096
#      rows) and decode (64 rows), 1-256 adapters of ranks 8-64, fastlora vs PEFT's mixed batch, the frozen linear
#      and fastlora's single-adapter op (goal: within 1.15x of it), outputs checked against PEFT's.
# First-run cost is bounded: FASTLORA_AUTOTUNE_TOP_K (3 here) benchmarks only the first 3 configs that the
# resource model keeps per kernel and key, and the Triton cache (TRITON_CACHE_DIR) persists between the steps.
# A test failure does not stop the benchmark; a benchmark stopped by its budget still writes what it measured; both
# outcomes are reported at the end, and the exit status is non-zero if a step failed, missed a goal or had no time
# left. With $OUT set (the device runner copies $OUT back: at most 8 files, two folders deep),
# $OUT holds two files: gpu_check.log (the whole log, written as it goes) and gpu_check.tgz (junit xml, every
# step's results.json/.md/.png; repacked after each step, so a run cut short still returns what it measured).
# Without $OUT everything stays in ./gpu_check_out/.
# Budget: TOTAL_BUDGET_S (420 s) bounds the whole script: each step gets its own budget or what is left of the
# total, whichever is less, and a step with under 10 s left is skipped (said in the log). A device lease is 15
# minutes in all, start-up included: 7 minutes for the first call leave room to rerun a step.
#
# Knobs (environment), e.g. for a dry run on a CPU-only machine:
#   DEVICE=cpu DTYPE=float32 SHAPES=64x128x128 TESTS=tests/test_bench.py bash benchmarks/gpu_check.sh
#   DEVICE (cuda)  DTYPE (bfloat16)  RANK (16)  SHAPES (llm-grid)  DROPOUT (0,0.1)  MODES (forward+backward,forward)
#   PROVIDERS (fastlora,peft,naive,base)  BENCH_BUDGET (0.15 s of timing per measurement)
#   TESTS (tests)  PYTEST_ARGS (-q --maxfail=5 --durations=15)  TEST_BUDGET_S (150)  BENCH_BUDGET_S (100)
#   DECODE_SHAPES (decode: M ∈ {1,16,64}, K=N=4096)  DECODE_BUDGET_S (20)
#   CUBLAS_SHAPES (4096x4096x4096,8192x4096x4096,8192x8192x8192)  CUBLAS_BUDGET_S (25)
#   AUTOTUNE_TOP_K (3; 0 = every config)  DISPATCH_SHAPES (all: llm-grid + decode)  DISPATCH_BUDGET_S (40)
#   QLORA_SHAPES (decode)  QLORA_BUDGET_S (30)  DORA_SHAPES (dora_check.py's goal shapes)  DORA_BUDGET_S (30)
#   SKIP_INSTALL=1 (do not pip install)  SKIP_TESTS=1  SKIP_DECODE=1  SKIP_CUBLAS=1  SKIP_DISPATCH=1  SKIP_QLORA=1
#   SKIP_DORA=1  MOE_PRESETS (auto)  MOE_BUDGET_S (30)  SKIP_MOE=1  MIXED_PRESETS (decode,prefill)
#   MIXED_BUDGET_S (40)  SKIP_MIXED=1  PYTHON (python)  TOTAL_BUDGET_S (420)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
RANK=${RANK:-16}
SHAPES=${SHAPES:-llm-grid}
DROPOUT=${DROPOUT:-0,0.1}
MODES=${MODES:-forward+backward,forward}  # forward+backward first: the goals that matter most
PROVIDERS=${PROVIDERS:-fastlora,peft,naive,base}
BENCH_BUDGET=${BENCH_BUDGET:-0.15}
TESTS=${TESTS:-tests}
PYTEST_ARGS=${PYTEST_ARGS:--q --maxfail=5 --durations=15 -p no:cacheprovider}
TEST_BUDGET_S=${TEST_BUDGET_S:-150}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-100}
DECODE_SHAPES=${DECODE_SHAPES:-decode}
DECODE_BUDGET_S=${DECODE_BUDGET_S:-20}
CUBLAS_SHAPES=${CUBLAS_SHAPES:-4096x4096x4096,8192x4096x4096,8192x8192x8192}
CUBLAS_BUDGET_S=${CUBLAS_BUDGET_S:-25}
DISPATCH_SHAPES=${DISPATCH_SHAPES:-all}
DISPATCH_BUDGET_S=${DISPATCH_BUDGET_S:-40}
QLORA_SHAPES=${QLORA_SHAPES:-decode}
QLORA_BUDGET_S=${QLORA_BUDGET_S:-30}
DORA_BUDGET_S=${DORA_BUDGET_S:-30}
MOE_BUDGET_S=${MOE_BUDGET_S:-30}
MIXED_PRESETS=${MIXED_PRESETS:-decode,prefill}
MIXED_BUDGET_S=${MIXED_BUDGET_S:-40}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-420}
export FASTLORA_AUTOTUNE_TOP_K=${AUTOTUNE_TOP_K:-3}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [[ -n "${OUT:-}" ]]; then  # the device runner: results in a work folder, packed into $OUT after each step
    RESULTS=$(mktemp -d /tmp/gpu_check.XXXXXX)
    LOG="$OUT/gpu_check.log"
else
    RESULTS=$REPO/gpu_check_out
    LOG="$RESULTS/gpu_check.log"
fi
mkdir -p "$RESULTS"
exec > >(tee "$LOG") 2>&1

START=$(date +%s)
stamp() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }
# pack() puts the results gathered so far into $OUT/gpu_check.tgz (one file, however many the steps wrote)
pack() {
    if [[ -n "${OUT:-}" ]]; then
        tar czf "$OUT/gpu_check.tgz.part" -C "$RESULTS" . && mv -f "$OUT/gpu_check.tgz.part" "$OUT/gpu_check.tgz" || true
    fi
}
# over N: true (and says so) when the total budget leaves no time for a step
over() { [[ "$1" == 0 ]] && echo "!!! skipped: the total budget (TOTAL_BUDGET_S=$TOTAL_BUDGET_S) is spent"; }
# step RC_VAR LABEL SECONDS COMMAND...: COMMAND under the step's budget (SIGINT so that it writes what it measured,
# SIGKILL 20 s later), its exit status into RC_VAR (no-time when the total budget is spent), a failure said, the
# results packed
step() {
    local var=$1 label=$2 b rc=0
    b=$(budget "$3")
    shift 3
    if over "$b"; then
        printf -v "$var" %s no-time
    else
        timeout -s INT -k 20 "$b" "$@" || rc=$?
        printf -v "$var" %s "$rc"
        [[ $rc -eq 0 ]] || echo "!!! $label: FAILED, a goal MISSED, or stopped by its ${b}s budget (rc=$rc)"
    fi
    pack
}
# budget N: N seconds, or what is left of TOTAL_BUDGET_S (keeping 40 s for the stop signal's grace and the
# summary), whichever is less; 0 when under 10 s are left
budget() {
    local left=$(( TOTAL_BUDGET_S - ($(date +%s) - START) - 40 ))
    local b=$1
    (( left < b )) && b=$left
    (( b < 10 )) && b=0
    echo "$b"
}

stamp "fastlora gpu_check in $REPO, results to $RESULTS ($(date -u '+%Y-%m-%d %H:%M UTC'))"
echo "git: $(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null || echo 'not a git checkout')"

install_rc=0
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
    stamp "pip install --no-deps --no-build-isolation -e ."
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e "$REPO" || install_rc=$?
    [[ $install_rc -eq 0 ]] || echo "!!! install failed (rc=$install_rc): continuing with what is importable"
fi

stamp "versions"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    nvidia-smi -L || true
else
    echo "nvidia-smi: not found"
fi
env_rc=0
"$PYTHON" - "$DEVICE" <<'EOF' || env_rc=$?
import sys, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for name in ("triton", "peft", "transformers", "pytest_benchmark", "matplotlib"):
    try:
        mod = __import__(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
import fastlora
from fastlora import backend
print(f"fastlora {fastlora.__version__} from {fastlora.__file__}, backend {fastlora.get_backend()}")
device = torch.device(sys.argv[1])
if device.type == "cuda" and torch.cuda.is_available():
    print(f"{torch.cuda.get_device_name(device)}: {torch.cuda.get_device_properties(device)}")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        print(f"  lora_linear on cuda {dt}: {'Triton kernels' if backend.use_triton(device, dt) else 'torch fallback'}")
EOF
[[ $env_rc -eq 0 ]] || echo "!!! environment check failed (rc=$env_rc)"

test_rc=skipped
if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
    b=$(budget "$TEST_BUDGET_S")
    stamp "tests: timeout ${b}s python -m pytest $TESTS $PYTEST_ARGS"
    if over "$b"; then test_rc=no-time; else
    test_rc=0
    # SIGINT first so pytest prints its summary of what ran; SIGKILL 20 s later if it does not stop.
    # shellcheck disable=SC2086
    timeout -s INT -k 20 "$b" "$PYTHON" -m pytest $TESTS $PYTEST_ARGS \
        --junitxml="$RESULTS/tests.xml" || test_rc=$?
    case $test_rc in
        0) echo "tests: passed" ;;
        124|130|137) echo "!!! tests: stopped by the ${b}s budget (rc=$test_rc); see above for what ran" ;;
        *) echo "!!! tests: FAILED (rc=$test_rc); continuing to the benchmark" ;;
    esac
    fi
    pack
fi

stamp "benchmark: $DEVICE $DTYPE r=$RANK shapes=$SHAPES dropout=$DROPOUT modes=$MODES providers=$PROVIDERS"
step bench_rc benchmark "$BENCH_BUDGET_S" "$PYTHON" -m fastlora bench --device "$DEVICE" --dtype "$DTYPE" \
    --rank "$RANK" --shapes "$SHAPES" --dropout "$DROPOUT" --modes "$MODES" --providers "$PROVIDERS" \
    --budget "$BENCH_BUDGET" --goals cuda-kernels --out "$RESULTS"

decode_rc=skipped
if [[ "${SKIP_DECODE:-0}" != "1" ]]; then
    # issue 3: inference at M <= 64 must not be slower than the base linear plus the two skinny GEMMs (peft math)
    stamp "decode benchmark: inference, $DTYPE r=$RANK shapes=$DECODE_SHAPES"
    step decode_rc "decode benchmark" "$DECODE_BUDGET_S" \
        "$PYTHON" -m fastlora bench --device "$DEVICE" --dtype "$DTYPE" \
        --rank "$RANK" --shapes "$DECODE_SHAPES" --dropout 0 --modes inference --providers "$PROVIDERS" \
        --budget "$BENCH_BUDGET" --no-plot --out "$RESULTS/decode"
fi

cublas_rc=skipped
if [[ "${SKIP_CUBLAS:-0}" != "1" ]]; then
    # The Triton GEMM (default) vs cuBLAS + a Triton LoRA epilogue pass: compare fastlora's rows here with the
    # same shapes in the main benchmark above (same machine, same run).
    stamp "FASTLORA_BASE_GEMM=cublas: $DTYPE r=$RANK shapes=$CUBLAS_SHAPES"
    step cublas_rc "cublas benchmark" "$CUBLAS_BUDGET_S" env FASTLORA_BASE_GEMM=cublas "$PYTHON" -m fastlora bench \
        --device "$DEVICE" --dtype "$DTYPE" --rank "$RANK" --shapes "$CUBLAS_SHAPES" --dropout 0 \
        --modes forward+backward,forward --providers fastlora,base --budget "$BENCH_BUDGET" --no-plot \
        --out "$RESULTS/cublas"
fi

dispatch_rc=skipped
if [[ "${SKIP_DISPATCH:-0}" != "1" && "$DEVICE" == cuda* ]]; then
    stamp "dispatch: which base-GEMM composition wins per shape ($DTYPE r=$RANK shapes=$DISPATCH_SHAPES)"
    step dispatch_rc "dispatch report" "$DISPATCH_BUDGET_S" \
        "$PYTHON" benchmarks/dispatch_report.py --shapes "$DISPATCH_SHAPES" \
        --rank "$RANK" --dtype "$DTYPE" --dropout "$DROPOUT" --json "$RESULTS/dispatch.json"
fi

qlora_rc=skipped
if [[ "${SKIP_QLORA:-0}" != "1" ]]; then
    if "$PYTHON" -c "import bitsandbytes" >/dev/null 2>&1; then
        stamp "QLoRA: fastlora vs PEFT's QLoRA layer vs bnb dequantize+matmul ($DTYPE shapes=$QLORA_SHAPES)"
        step qlora_rc "QLoRA check" "$QLORA_BUDGET_S" "$PYTHON" benchmarks/qlora_check.py --device "$DEVICE" \
            --dtype "$DTYPE" --shapes "$QLORA_SHAPES" --out "$RESULTS/qlora"
    else
        echo "bitsandbytes does not import: the QLoRA section is skipped"
    fi
fi

dora_rc=skipped
if [[ "${SKIP_DORA:-0}" != "1" ]]; then
    stamp "DoRA: fastlora's DoRA step vs its LoRA step and PEFT's DoRA ($DTYPE r=$RANK)"
    step dora_rc "DoRA check" "$DORA_BUDGET_S" \
        "$PYTHON" benchmarks/dora_check.py --device "$DEVICE" --dtype "$DTYPE" \
        --rank "$RANK" ${DORA_SHAPES:+--shapes "$DORA_SHAPES"} --out "$RESULTS/dora"
fi

moe_rc=skipped
if [[ "${SKIP_MOE:-0}" != "1" ]]; then
    stamp "MoE: fastlora vs PEFT's target_parameters LoRA vs the frozen block (${MOE_PRESETS:-auto}, $DTYPE r=$RANK)"
    step moe_rc "MoE benchmark" "$MOE_BUDGET_S" "$PYTHON" -m fastlora bench --moe "${MOE_PRESETS:-auto}" \
        --device "$DEVICE" --dtype "$DTYPE" --rank "$RANK" --budget "$BENCH_BUDGET" --out "$RESULTS/moe"
fi
mixed_rc=skipped
if [[ "${SKIP_MIXED:-0}" != "1" && "$DEVICE" == cuda* ]]; then
    stamp "mixed-adapter batches: fastlora vs PEFT's mixed batch vs the single-adapter op ($MIXED_PRESETS)"
    step mixed_rc "mixed-batch check" "$MIXED_BUDGET_S" \
        "$PYTHON" benchmarks/mixed_check.py --preset "$MIXED_PRESETS" \
        --budget 0.1 --out "$RESULTS/mixed"
fi

stamp "summary"
if [[ -f "$RESULTS/results.json" ]]; then
    "$PYTHON" - "$RESULTS/results.json" <<'EOF' || true
import json, sys
report = json.load(open(sys.argv[1]))
meta = report["meta"]
print(f"{meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date_utc']}")
errors = sorted({f"{r['provider']}: {r['error']}" for r in report["results"] if r.get("error")})
from fastlora.bench.report import summary_table  # geomeans over comparable cases, goals MET / MISSED
print(summary_table(report["summary"]))
for e in errors:
    print(f"  error: {e}")
EOF
else
    echo "no results.json: the benchmark did not finish"
fi
if [[ -f "$RESULTS/decode/results.json" ]]; then
    "$PYTHON" - "$RESULTS/decode/results.json" <<'EOF' || true
import json, sys
report = json.load(open(sys.argv[1]))
rows = {}
for r in report["results"]:
    rows.setdefault((r["M"], r["K"], r["N"]), {})[r["provider"]] = r.get("time_ms")
print("decode (inference, median ms):")
for (M, K, N), g in sorted(rows.items()):
    print(f"  M={M:<3} K={K} N={N}  " + "  ".join(f"{p} {'err' if t is None else f'{t:.4f}'}" for p, t in g.items()))
EOF
fi
if [[ -f "$RESULTS/cublas/results.json" && -f "$RESULTS/results.json" ]]; then
    "$PYTHON" - "$RESULTS/results.json" "$RESULTS/cublas/results.json" <<'EOF' || true
import json, sys
def times(path):
    out = {}
    for r in json.load(open(path))["results"]:
        if r.get("time_ms") is not None and r["dropout"] == 0:
            out[(r["mode"], r["M"], r["K"], r["N"], r["provider"])] = r["time_ms"]
    return out
tri, cub = times(sys.argv[1]), times(sys.argv[2])
print("base GEMM: auto (default: measured per problem) vs forced cublas, fastlora median ms (dropout 0), and the frozen linear:")
for key in sorted(k for k in cub if k[-1] == "fastlora"):
    mode, M, K, N, _ = key
    t = tri.get(key)
    print(f"  {mode:<17} {M}x{K}x{N}  auto {'-' if t is None else f'{t:.3f}'}  cublas {cub[key]:.3f}  "
          f"base {cub.get((mode, M, K, N, 'base'), float('nan')):.3f}")
EOF
fi
echo "install rc=$install_rc, tests rc=$test_rc, benchmark rc=$bench_rc, decode rc=$decode_rc, cublas rc=$cublas_rc," \
     "dispatch rc=$dispatch_rc, qlora rc=$qlora_rc, dora rc=$dora_rc, moe rc=$moe_rc, mixed rc=$mixed_rc," \
     "total $(( $(date +%s) - START ))s"
pack
if [[ -n "${OUT:-}" ]]; then echo "log in $LOG; tests.xml and every step's results in $OUT/gpu_check.tgz"
else echo "log, tests.xml, results.json/.md/.png in $RESULTS"; fi
[[ $install_rc -eq 0 && ( $test_rc == 0 || $test_rc == skipped ) && $bench_rc == 0 \
   && ( $decode_rc == 0 || $decode_rc == skipped ) && ( $cublas_rc == 0 || $cublas_rc == skipped ) \
   && ( $dispatch_rc == 0 || $dispatch_rc == skipped ) && ( $qlora_rc == 0 || $qlora_rc == skipped ) \
   && ( $dora_rc == 0 || $dora_rc == skipped ) && ( $moe_rc == 0 || $moe_rc == skipped ) \
   && ( $mixed_rc == 0 || $mixed_rc == skipped ) ]]
