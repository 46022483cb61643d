#!/usr/bin/env bash
# The test command: installs the pinned requirements (a no-op when they are already there) and runs the default
# test suite (learning tests marked `slow` are deselected; run them with: bash scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python3 -m pytest "$@"
