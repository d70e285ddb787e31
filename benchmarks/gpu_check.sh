#!/usr/bin/env bash
# One-shot GPU check of the benchmarks: about 9 minutes at most, every stage under its own `timeout`.
#
#   bash benchmarks/gpu_check.sh          # from the repository root, on the lent GPU machine
#
# Writes to $OUT (default: benchmarks/results): encoder_cuda.{json,md,png}, generation_cuda.{json,md,png}
# (decode latency / cache to 64k, training throughput at 8k) and gpu_check.log: 7 files. The reports are
# rewritten after every measured model, so a stage stopped by its cap still leaves valid partial tables.
#
# Stages and caps (seconds; override with the environment variables):
#   setup                       install the carried wheels (no network: seconds), print versions and the GPU
#   encoder    ENCODER_CAP=250  HierarchicalModel vs BERT/Longformer/BigBird/ModernBERT, bf16, sdpa,
#                               forward and train step at 4k 16k 64k 128k (one process per model)
#   decode     DECODE_CAP=150   HierarchicalXLForCausalLM vs GPT-2/Llama/Mistral, bf16, real prefill,
#                               per-token latency and cache bytes at 1k 4k 16k 64k
#   training   TRAIN_CAP=60     tokens/s of a training step at 8k, ours vs GPT-2
# Total: 460 s of caps, plus the setup (about 20 s).
#
# Dependencies. The machine has torch + CUDA, matplotlib, tqdm, numpy, safetensors, tokenizers, huggingface_hub,
# pyarrow, pandas, xxhash, fsspec, but no internet and an older transformers. These travel as wheels in .whl/
# (name ".whl" in the run's `carry`), downloaded here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (`import hier_transformers` imports hier_transformers.data, which needs datasets -> dill, multiprocess; without
# them the benchmarks load the model files alone, see harness.import_ours, so only transformers is essential.)
# transformers 5.24 needs huggingface_hub >= 1.31 and tokenizers >= 0.23.1 (the image had 1.33 / 0.23.2 when
# last read); if the setup stage says otherwise, add huggingface_hub==2.4.0 / tokenizers==0.23.3 to the wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

stage() {  # stage NAME CAP COMMAND...: run COMMAND under `timeout CAP`, log it, never abort the script
    local name=$1 cap=$2
    shift 2
    echo "=== stage $name (cap ${cap}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$cap" "$@" 2>&1 | grep --line-buffered -v -E '^\s*(encoder|generation|training):' | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== stage $name: exit $rc after $((SECONDS - start))s$([ "$rc" = 124 ] && echo ' (hit its cap)')" | tee -a "$LOG"
}

setup() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "setup: installing .whl/*.whl failed"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 - <<'EOF'
import huggingface_hub, tokenizers, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", gpu)
print("transformers", transformers.__version__, "huggingface_hub", huggingface_hub.__version__, "tokenizers", tokenizers.__version__)
import sys
sys.path.insert(0, "benchmarks")
from harness import import_ours  # falls back to the model files alone where `datasets` is missing
import_ours("modeling_hierarchical", "HierarchicalModel")
import_ours("modeling_hierarchical_xl", "HierarchicalXLForCausalLM")
print("hier_transformers model files import")
EOF
}

echo "=== stage setup" | tee -a "$LOG"
setup > >(tee -a "$LOG") 2>&1  # in this shell, so that its PYTHONPATH stays exported
if ! python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from harness import import_ours; import_ours('modeling_hierarchical_xl')" >>"$LOG" 2>&1; then
    echo "setup failed: the model files do not import (see $LOG); missing wheels (transformers 5.24)?" | tee -a "$LOG"
    exit 1
fi

# A dry run of the plumbing on a CPU machine, in a minute:
#   DEVICE=cpu DTYPE=fp32 ENCODER_LENGTHS="1024 2048" CONTEXTS="1024 2048" TRAIN_LENGTH=1024 \
#   EXTRA="--hidden-size 64 --num-layers 2" OUT=/tmp/gpu_dry bash benchmarks/gpu_check.sh
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
read -r -a EXTRA_ARGS <<<"${EXTRA:-}"
read -r -a ENCODER_LENGTHS <<<"${ENCODER_LENGTHS:-4096 16384 65536 131072}"
read -r -a CONTEXTS <<<"${CONTEXTS:-1024 4096 16384 65536}"

stage encoder "${ENCODER_CAP:-250}" python3 benchmarks/bench_encoder.py --device "$DEVICE" --dtype "$DTYPE" \
    --lengths "${ENCODER_LENGTHS[@]}" --warmup 1 --repeats 5 --budget-s 3 --case-timeout 45 --out-dir "$OUT" \
    "${EXTRA_ARGS[@]}"

stage decode "${DECODE_CAP:-150}" python3 benchmarks/bench_generation.py --device "$DEVICE" --dtype "$DTYPE" \
    --contexts "${CONTEXTS[@]}" --peer-prefill real --decode-steps 32 --no-train --case-timeout 30 --out-dir "$OUT" \
    "${EXTRA_ARGS[@]}"

# --append keeps the decode records of the stage before in generation_cuda.json.
stage training "${TRAIN_CAP:-60}" python3 benchmarks/bench_generation.py --device "$DEVICE" --dtype "$DTYPE" \
    --contexts "${CONTEXTS[@]}" --peer-prefill real --no-decode --append --train-length "${TRAIN_LENGTH:-8192}" --repeats 5 \
    --budget-s 5 --case-timeout 25 --out-dir "$OUT" "${EXTRA_ARGS[@]}"

ls -la "$OUT" | tee -a "$LOG"
