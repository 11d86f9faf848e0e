#!/usr/bin/env bash
# The CUDA checks, in one run on a machine with a GPU, PyTorch, Triton, transformers and peft (no network):
#   1. the CUDA-graph and correctness-contract tests on the GPU, strict;
#   2. decode throughput (benchmarks/engine_throughput.py: 32 distinct adapters vs none, vs PEFT LoRA, vs
#      transformers) and, with PROFILE=1, where a step's time goes (benchmarks/step_profile.py), on the
#      default model's architecture with random weights;
#   3. the engine and trainer tests with every engine and trainer they build on the GPU
#      (S2FT_TEST_DEVICE=cuda; their transformers references stay on the CPU), and the GPU kernel's tests.
# Needs the default model's config and tokenizer files in .gpu/smol (copied from the converted model in
# ~/.cache/s2ft_serve/models/SmolLM2-135M-Instruct, without model.safetensors) and, where the machine lacks
# pytest-asyncio, its wheel in .whl/. Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
# Knobs: DTYPES ("bfloat16 float32"), KERNELS (auto: the GPU kernel; auto,torch adds embedding_bag),
# GRAPHS (on,off: decode steps as CUDA graphs, and eager), PEFT (1), PROFILE (0), TESTS (1: the whole
# engine and trainer suite last), GRAPH_TEST_TIMEOUT (200 s), TEST_TIMEOUT (300 s), BENCH_TIMEOUT (180 s
# per dtype). A first run on a 15-minute lease: DTYPES=bfloat16 PEFT=0 TESTS=0 (about 5 minutes).
set -u
out=${1:-/tmp/gpu-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'peft', peft.__version__)"

# 1. CUDA graphs first, strict (a capture failure raises, with its traceback, instead of falling back)
S2FT_TEST_DEVICE=cuda S2FT_CUDA_GRAPHS_STRICT=1 timeout "${GRAPH_TEST_TIMEOUT:-200}" python3 -m pytest -q -x \
    -p no:cacheprovider -rfE tests/unit/engine/test_graphs.py tests/unit/engine/test_correctness.py \
    > "$out/graph-tests.log" 2>&1
echo "graph tests: rc=$?"; tail -n 30 "$out/graph-tests.log"

# 2. decode throughput: graphs vs eager, 32 adapters vs none, vs PEFT, vs transformers
python3 benchmarks/random_model.py --source .gpu/smol --out /tmp/smol-random > /dev/null 2>&1 || exit 1
for dtype in ${DTYPES:-bfloat16 float32}; do
    if [ "${PROFILE:-0}" = 1 ]; then
        timeout 120 python3 benchmarks/step_profile.py --device cuda --model /tmp/smol-random --dtype $dtype \
            --batch 32 --top 15 > "$out/profile-$dtype.log" 2>&1
        grep -E "^== |mixed/base" "$out/profile-$dtype.log"
    fi
    timeout "${BENCH_TIMEOUT:-180}" python3 benchmarks/engine_throughput.py --device cuda --model /tmp/smol-random \
        --dtype $dtype --batch 32 --tokens 32 --repeats 3 --gemm exact --kernel "${KERNELS:-auto}" \
        --cuda-graphs "${GRAPHS:-on,off}" \
        $([ "${PEFT:-1}" = 1 ] || echo --skip-peft) > "$out/throughput-$dtype.log" 2>&1
    grep -E "^engine |^decode|Error" "$out/throughput-$dtype.log"
done

# 3. every engine and trainer test on the GPU (TESTS=0 skips them)
if [ "${TESTS:-1}" = 1 ]; then
    S2FT_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE --timeout 120 \
        tests/unit/engine tests/unit/train/test_train_engine.py tests/unit/train/test_train_trainer.py \
        tests/unit/adapters/test_gpu_kernel.py --ignore tests/unit/engine/test_guided.py > "$out/tests.log" 2>&1
    echo "tests: rc=$?"; tail -n 30 "$out/tests.log"
fi
