#!/usr/bin/env bash
# The GPU checks of the S2 kernels in one short run, for a machine with one NVIDIA GPU and JAX with CUDA
# but no jaxlm installed (and no network): the compiled jax-triton and Pallas-Triton kernels against the
# reference (tests/test_s2_gpu.py), then their timings against cuDNN flash attention (bench/s2_attention.py --gpu).
#
#   bash bench/gpu_check.sh [OUT_DIR]        # wheels missing there (jax-triton) may wait in .whl/
set -uo pipefail
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import jaxlm.kernels" 2>/dev/null; then  # not installed: the source tree, kernels/ as jaxlm.kernels
  [[ -e jaxlm/kernels ]] || ln -s ../kernels jaxlm/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi -L
"$py" -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
timeout 240 "$py" -m pytest -q -s -p no:cacheprovider tests/test_s2_gpu.py 2>&1 | tee "$out/gpu_tests.log" | grep -v "max abs err"
tests=$?
timeout 240 "$py" bench/s2_attention.py --gpu 2>&1 | tee "$out/gpu_bench.log"
bench=$?
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
