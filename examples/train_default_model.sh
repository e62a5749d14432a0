#!/usr/bin/env bash
# Rebuild regla/default_model/, the model `regla chat` / `regla generate` use when no --model
# is given. Exactly the commands that produced the shipped files (README_default_model.md).
set -euo pipefail
cd "$(dirname "$0")/.."

# 1. The texts, from Debian packages (needs root): the King James Bible (public domain; read
#    with the `bible` program that bible-kjv-text pulls in) and the Python 3.11 docs (PSF License).
apt-get install -y bible-kjv-text python3.11-doc

# 2. Corpus -> byte-level BPE of 8192 tokens, train.bin / val.bin (uint16), tokenizer/ (~10 s).
python examples/prepare_default_corpus.py train_data --vocab 8192

# 3. Train: 5.6M parameters, 1500 steps of 16 x 512 tokens (12.3M tokens, 3.2 epochs), fp32.
#    On one H200 through the Triton kernels: ~55 s (~220k tokens/s). bf16 autocast diverges
#    at this size (README_default_model.md says what was measured); fp32 does not. On a CPU
#    add --device cpu (hours on 2 cores).
regla train --data train_data/train.bin --val-data train_data/val.bin --tokenizer train_data/tokenizer \
  --preset 10m --model '{"num_hidden_layers": 4}' --seq-len 512 --batch-size 16 --max-steps 1500 \
  --lr 1e-3 --warmup-steps 200 --eval-interval 250 --eval-batches 16 --save-interval 1500 \
  --dtype fp32 --export-dtype bf16 --seed 0 --no-progress --out runs/default_model

# 4. Into the package: one bf16 model.safetensors, config.json, tokenizer files.
python examples/pack_default_model.py runs/default_model/final regla/default_model
