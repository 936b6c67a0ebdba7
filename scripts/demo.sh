#!/usr/bin/env bash
# The whole pipeline on the shipped sample export, offline, on CPU, in a few minutes:
#   prepare -> tiny model -> train (QLoRA) -> merge -> eval -> one chat reply.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default: demo/)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo}
rm -rf "$out"
mkdir -p "$out"

echo "== 1/6 prepare: tests/fixtures/sample_export -> $out/prepared"
python -m slackdist prepare tests/fixtures/sample_export --out "$out/prepared" --split 70,15,15

echo "== 2/6 tiny-model: a random Llama-3-architecture model with our tokenizer -> $out/tiny-model"
python -m slackdist tiny-model "$out/tiny-model"

echo "== 3/6 train: QLoRA on CPU -> $out/finetuned"
python -m slackdist train --model "$out/tiny-model" --data "$out/prepared" --output "$out/finetuned" \
  --num-epochs 8 --max-seq-len 1024 --micro-batch-size 2 --gradient-accumulation-steps 1 --lr 2e-3 \
  --eval-every-n-steps 5 --save-every-n-steps 10

echo "== 4/6 merge: adapter + 16-bit base -> $out/merged (sharded safetensors)"
python -m slackdist merge --adapter "$out/finetuned" --output "$out/merged" --dtype fp32 --max-shard-size 200KB

echo "== 5/6 eval: held-out loss, base vs tuned -> $out/finetuned/eval.md"
python -m slackdist eval --model-dir "$out/finetuned" --data "$out/prepared" --num-samples 2 --max-new-tokens 16

echo "== 6/6 chat: one reply from the tuned model (the tiny model is random, so its reply is noise)"
python -m slackdist chat --model-dir "$out/finetuned" --prompt "Did the deploy go out?" --max-new-tokens 24 --seed 0

echo
echo "Done. Prepared data: $out/prepared (report.md), adapter: $out/finetuned, merged model: $out/merged,"
echo "TensorBoard: tensorboard --logdir $out/finetuned/runs"
