#!/usr/bin/env bash
# The shapes world end to end on this machine: set-up (idempotent), then `spatialscore demo`. Extra args go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/spatialscore demo "$@"
