#!/usr/bin/env bash
# Start a spatialscore trainer on every node of a DeepSpeed-style hostfile over ssh, one launcher per node.
#
#   launch/hostfile.sh launch/hostfile.example train-grpo recipes/paper/flow_grpo_flux.yaml --launch zero2
#
# Node i of the file runs the same command with --node-rank i, --nproc (its slots), --nnodes, --master-addr (the first
# host) and --master-port; the run directory is shared. SSH (default ssh), MASTER_PORT, OUT and SPATIALSCORE override
# the defaults (SSH defaults to `ssh -tt`: with a terminal, killing the local ssh also hangs up the remote trainer).
# When one node fails, the others are stopped, and the script exits with the first failure's code.
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: launch/hostfile.sh HOSTFILE VERB RECIPE [key=value ...] [--launch PRESET] [...]" >&2
    exit 2
fi
HOSTFILE="$1"; shift
[ -f "$HOSTFILE" ] || { echo "error: $HOSTFILE: no such hostfile" >&2; exit 2; }
read -r -a ssh_cmd <<<"${SSH:-ssh -tt}"
SPATIALSCORE="${SPATIALSCORE:-.venv/bin/spatialscore}"
MASTER_PORT="${MASTER_PORT:-29500}"
OUT="${OUT:-runs/$1-$(date +%Y%m%d-%H%M%S)}"

hosts=(); slots=()
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line="${line%%#*}"
    [ -z "${line// }" ] && continue
    read -r host spec rest <<<"$line"
    if [[ ! "$spec" =~ ^slots=[1-9][0-9]*$ ]] || [ -n "${rest:-}" ]; then
        echo "error: $HOSTFILE line $lineno: expected 'HOST slots=N', got '$line'" >&2
        exit 2
    fi
    hosts+=("$host"); slots+=("${spec#slots=}")
done <"$HOSTFILE"
[ ${#hosts[@]} -gt 0 ] || { echo "error: $HOSTFILE: no hosts" >&2; exit 2; }
for n in "${slots[@]}"; do
    [ "$n" = "${slots[0]}" ] || { echo "error: $HOSTFILE: every node needs the same slots (got ${slots[*]})" >&2; exit 2; }
done

# the remote login shell must be bash (printf %q quoting); wait -n needs bash >= 4.3
quoted="$(printf ' %q' "$SPATIALSCORE" "$@")"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for i in "${!hosts[@]}"; do
    "${ssh_cmd[@]}" "${hosts[$i]}" "cd $(printf %q "$PWD") &&$quoted --nproc ${slots[$i]} --nnodes ${#hosts[@]} \
--node-rank $i --master-addr $(printf %q "${hosts[0]}") --master-port $MASTER_PORT --out $(printf %q "$OUT")" &
    pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
    wait -n && continue
    code=$?
    if [ "$status" -eq 0 ]; then  # the first node to fail: stop the others, keep its exit code
        status=$code
        kill "${pids[@]}" 2>/dev/null || true
    fi
done
trap - EXIT
exit "$status"
