#!/usr/bin/env bash
# The GPU checks in one call, for a short lease on a CUDA machine: the CUDA and Triton tests, then
# the side-by-side benchmarks with --device cuda. Each step has its own time limit, so one that
# hangs or fails leaves the others their turn; logs go to OUTDIR/<step>.log.
#
#   bash benchmarks/cuda_checks.sh OUTDIR
#
# Run from the repository root: every benchmark is a module (python3 -m benchmarks.<name>).
# Optional packages the GPU image lacks (titans-pytorch and its dependencies for the comparison)
# are installed from wheels in .whl/ when that folder exists (benchmarks/results_titans_pytorch.md
# says which).
set -u
OUT=${1:?usage: bash benchmarks/cuda_checks.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nl-site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/nl-site"
fi
# The tests need the installed package (nl_lightning.callbacks is mapped from callbacks/ by setup.py);
# the benchmarks build through the public API and run from the checkout.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/nl-project . \
    >"$OUT/install.log" 2>&1 || echo "project install failed: $OUT/install.log"
INSTALLED=(env PYTHONPATH="/tmp/nl-project:$PYTHONPATH")
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

SKIP=" ${SKIP:-} "  # e.g. SKIP="tests titans_pytorch" to rerun only the rest
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, print the tail
    local name=$1 limit=$2
    shift 2
    [[ $SKIP == *" $name "* ]] && return
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -e "^USDT" -e "Warning" -e "warnings.warn" "$OUT/$name.log" | tail -n "${TAIL:-30}"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

# A hanging test then fails with its stack instead of eating the whole step (pytest-timeout is in
# the GPU image; without it the flag is left out). Generous: the first Triton test at 64-wide
# blocks compiles the backward kernel, which takes minutes on a slow host CPU.
PER_TEST=()
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=150)
TINY=(--seq-len 1024 --max-bytes 2000000)
# In order of what is least known: later steps are the first cut when the lease runs short.
# -P and --import-mode=append: the checkout must not shadow the installed package (it lacks
# nl_lightning.callbacks); tests/ is a package, so pytest puts the checkout on sys.path, last.
# HOPE's DGD memory and its projection memories' writes as Triton kernels (impl="triton", both
# write rules), checked only under the interpreter so far: the tests at the model's sizes (the
# 64-wide kernels compile in about half a minute), then each op's timing against its ATen chunk
# path at HOPE-tiny's shapes (main memory D = Dh = 48, projections D = 192, Dh = 48, C = 64; same
# blocks, so the compiled kernels come from Triton's cache), then HOPE-tiny's training step with
# them (tokens/s;
# the MFU column misses the Triton kernels' FLOPs, which torch's FLOP counter cannot see).
step dgd_triton 420 "${INSTALLED[@]}" python3 -P -m pytest --import-mode=append -v -p no:cacheprovider --durations=12 "${PER_TEST[@]}" -k triton \
    tests/ops/test_dgd.py tests/ops/test_dgd_delta_rule.py tests/ops/test_projection_triton.py \
    tests/models/test_memory_models.py
step dgd_ops_triton 120 python3 -m benchmarks.dgd_ops --device cuda --impls naive chunk triton --dim 48 --hidden 48 \
    --batch 4 --heads 4 --lengths 1024 2048 --repeats 5 --rule delta
step projection_ops_triton 120 python3 -m benchmarks.projection_ops --device cuda --impls chunk triton \
    --lengths 1024 4096 --repeats 5
step throughput_hope_triton 150 python3 -m benchmarks.throughput transformer hope \
    --device cuda --steps 10 --warmup 3 "${TINY[@]}" --batch-size 4 --override memory_impl=triton
step tests 240 "${INSTALLED[@]}" python3 -P -m pytest --import-mode=append -v -p no:cacheprovider --durations=12 "${PER_TEST[@]}" -k "${TESTS:-cuda or triton}" \
    tests/ops tests/models/test_memory_models.py tests/benchmarks/test_dgd_ops.py tests/benchmarks/test_devices.py \
    tests/benchmarks/test_throughput.py
step throughput_tiny 100 python3 -m benchmarks.throughput transformer titans hope \
    --device cuda --steps 10 --warmup 3 "${TINY[@]}" --batch-size 4
# The same with every step replayed from a CUDA graph: the launch cost taken out of both sides.
step throughput_tiny_graph 120 python3 -m benchmarks.throughput transformer titans hope \
    --device cuda --cuda-graph --steps 10 --warmup 3 "${TINY[@]}" --batch-size 4
# At batch 4 every model is launch-bound on a large GPU; batch 32 gives the GPU work per kernel.
step throughput_tiny_b32 120 python3 -m benchmarks.throughput transformer titans hope \
    --device cuda --cuda-graph --steps 8 --warmup 2 "${TINY[@]}" --batch-size 32
# What a user gets from LanguageModel(compile={backend: cudagraphs}): dynamo traces the network
# (minutes for HOPE: its chunk loops unroll) and replays forward and backward from CUDA graphs.
step throughput_tiny_compiled 420 python3 -m benchmarks.throughput transformer hope \
    --device cuda --steps 10 --warmup 3 "${TINY[@]}" --batch-size 4 --compile '{"backend": "cudagraphs"}'
step dgd_ops 60 python3 -m benchmarks.dgd_ops --device cuda --lengths 1024 2048 --repeats 3
step memory_linear 100 python3 -m benchmarks.memory_ops --device cuda --kinds linear --compiled --triton --repeats 3 \
    --lengths 1024 2048 4096
step titans_pytorch 90 python3 -m benchmarks.titans_pytorch_compare --device cuda --lengths 1024 4096 \
    --theirs seq par --repeats 10 --memory-length 8192
step throughput_small_bf16 80 python3 -m benchmarks.throughput transformer titans hope \
    --device cuda --precision bf16-mixed --steps 5 --warmup 2 "${TINY[@]}" --batch-size 8 --preset small
step memory_mlp 50 python3 -m benchmarks.memory_ops --device cuda --kinds mlp --lengths 1024 2048 --repeats 3 --skip-memory
