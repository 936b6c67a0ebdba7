#!/usr/bin/env bash
# Build (and run, or print) the `accelerate launch` command of a SLURM job: one task per node, each node
# starting its GPUs' training processes with its own machine rank.
#
#   scripts/slurm_launch.sh [--print] [--] SLACKDIST_TRAIN_ARGS...   (in the batch script: srun on every node)
#   scripts/slurm_launch.sh --node [--] SLACKDIST_TRAIN_ARGS...      (what srun runs on each node)
#
# --print (or DRY_RUN=1) prints the srun line and the command each node runs, and exits.
# With --node and DRY_RUN=1 it prints the command with this node's rank filled in.
#
# Reads: SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST (expanded by `scontrol show hostnames`, or parsed here
# when scontrol is absent: "a,b" and "node[01-03,07]" forms), GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, then
# the count of `nvidia-smi -L`, then 1), LAUNCH_CONFIG (default launch_configs/fsdp.yaml), MAIN_PROCESS_PORT
# (default 29500), PYTHON_MODULE (default slackdist), SLACKDIST_COMMAND (default train).
#
# Preemption (--node): SIGUSR1 or SIGTERM to this script is passed on as SIGUSR1 to the training processes
# (the children of `accelerate launch`); they finish the current optimizer step, write a checkpoint and exit
# with 75 (EX_TEMPFAIL). The launcher itself would die on SIGUSR1 (Python's default action) and only gives
# workers 30 s after a SIGTERM, so the signal goes to the workers directly. Exit code: 75 when a signal came,
# else the launcher's.
set -euo pipefail

PREEMPT_EXIT=75

expand_nodelist() {
  # Print one hostname per line for a SLURM node list.
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list"
    return
  fi
  python3 - "$list" <<'PY'
import re, sys

def expand(spec):
    # split on commas outside brackets: "a[1-2],b" -> ["a[1-2]", "b"]
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for part in filter(None, parts):
        m = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", part)
        if not m:
            yield part
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                yield f"{prefix}{str(i).zfill(len(lo))}{suffix}"

print("\n".join(expand(sys.argv[1])))
PY
}

gpus_per_node() {
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    echo "$GPUS_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 1
  fi
}

# The per-node command, as an array in CMD. RANK is what goes after --machine_rank: the literal
# `$SLURM_NODEID` for the srun template (escaped, so that each node expands its own; unescaped, every node
# would get rank 0 and the rendezvous hangs: accelerate#2816), or a node's number.
build_cmd() {
  local rank="$1"
  shift
  local nnodes="${SLURM_NNODES:-1}" gpus hosts
  gpus="$(gpus_per_node)"
  CMD=(accelerate launch --config_file "${LAUNCH_CONFIG:-launch_configs/fsdp.yaml}" --num_processes "$((nnodes * gpus))")
  if ((nnodes > 1)); then
    # the whole list, then its first line (piping into `head` would break the pipe under pipefail)
    hosts="$(expand_nodelist "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")"
    CMD+=(--num_machines "$nnodes" --machine_rank "$rank" --main_process_ip "${hosts%%$'\n'*}"
      --main_process_port "${MAIN_PROCESS_PORT:-29500}" --rdzv_backend static --same_network)
  fi
  CMD+=(-m "${PYTHON_MODULE:-slackdist}" "${SLACKDIST_COMMAND:-train}" --resume auto "$@")
}

quoted() {
  # Shell-quote each word, except the literal $SLURM_NODEID (shown as srun's task would see it).
  local out="" word
  for word in "$@"; do
    if [[ "$word" == '$SLURM_NODEID' ]]; then
      out+=" $word"
    else
      out+=" $(printf '%q' "$word")"
    fi
  done
  echo "${out# }"
}

run_on_node() {
  build_cmd "${SLURM_NODEID:-0}" "$@"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    quoted "${CMD[@]}"
    return 0
  fi
  echo "[node ${SLURM_NODEID:-0}] $(quoted "${CMD[@]}")" >&2
  local preempted=0 rc=0
  "${CMD[@]}" &
  local launcher=$!
  forward() {
    preempted=1
    # the training processes are the launcher's children; pkill -P matches by parent pid only
    pkill -USR1 -P "$launcher" 2>/dev/null || kill -USR1 "$launcher" 2>/dev/null || true
  }
  trap forward USR1 TERM
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again until the launcher is gone.
  while true; do
    rc=0
    wait "$launcher" || rc=$?
    kill -0 "$launcher" 2>/dev/null || break
  done
  if ((preempted)); then
    return "$PREEMPT_EXIT"
  fi
  return "$rc"
}

main() {
  local mode=batch print=0
  while (($#)); do
    case "$1" in
      --node) mode=node; shift ;;
      --print) print=1; shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [[ "${DRY_RUN:-0}" == 1 ]] && print=1
  if [[ "$mode" == node ]]; then
    run_on_node "$@"
    return
  fi
  local nnodes="${SLURM_NNODES:-1}" self
  self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
  local srun_cmd=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$self" --node --)
  if ((print)); then
    echo "srun: $(quoted "${srun_cmd[@]}" "$@")"
    build_cmd '$SLURM_NODEID' "$@"
    echo "per-node: $(quoted "${CMD[@]}")"
    local i
    for ((i = 0; i < nnodes; i++)); do
      build_cmd "$i" "$@"
      echo "node $i: $(quoted "${CMD[@]}")"
    done
    return 0
  fi
  exec "${srun_cmd[@]}" "$@"
}

main "$@"
