#!/usr/bin/env bash
# N jaxlm processes on this machine, each with K CPU devices, joined by jax.distributed through a
# localhost coordinator: the multi-host code path (per-host data, cross-process collectives, Orbax
# writing from every process) without a cluster.
#
#   launch/local.sh -n 2 -d 4 -- train --config configs/quickstart.py --config.parallel.fsdp=8
#   launch/local.sh -n 2 -d 1 -- eval --checkpoint runs/quickstart/checkpoints \
#       --data asset:shakespeare/eval.jsonl --config.parallel.fsdp=2
#
# Each process gets `--coordinator 127.0.0.1:PORT --num-processes N --process-id I` appended (nothing
# when N is 1) and writes LOGS/process-I.log (process 0 is also shown here). The script waits for all
# of them; when one fails the others are stopped, and the exit status is that of the first failure
# (0 when all succeed).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh [options] [--] COMMAND [ARGS...]

COMMAND is a jaxlm subcommand (train, eval, ...) with its arguments.

options:
  -n, --num-processes N   processes to start (default 2)
  -d, --devices K         CPU devices per process: XLA_FLAGS=--xla_force_host_platform_device_count=K (default 4)
  -p, --port PORT         coordinator port on 127.0.0.1 (default: a free one)
  -l, --logs DIR          per-process logs (default launch_logs/local-DATE)
      --python PY         Python that has jaxlm installed (default: $PYTHON, else python3)
      --timeout SECONDS   stop every process after this long (default: none)
  -q, --quiet             do not echo process 0's output here
      --dry-run           print the commands and exit
  -h, --help              this help
EOF
}

num=2
devices=4
port=""
logs=""
python="${PYTHON:-python3}"
timeout=0
quiet=0
dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) num="$2"; shift 2 ;;
    -d|--devices) devices="$2"; shift 2 ;;
    -p|--port) port="$2"; shift 2 ;;
    -l|--logs) logs="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    -q|--quiet) quiet=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "local.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "local.sh: no jaxlm command given" >&2; usage >&2; exit 2
fi
for v in "$num" "$devices" "$timeout"; do
  if ! [[ "$v" =~ ^[0-9]+$ ]]; then echo "local.sh: expected a number, got '$v'" >&2; exit 2; fi
done
if (( num < 1 || devices < 1 )); then echo "local.sh: -n and -d must be >= 1" >&2; exit 2; fi

logs="${logs:-launch_logs/local-$(date +%Y%m%d-%H%M%S)}"
if [[ -z "$port" ]]; then
  if (( dry )); then
    port=PORT
  else
    for _ in $(seq 100); do  # a port nothing listens on
      port=$((20000 + RANDOM % 40000))
      if ! (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    done
  fi
fi

# keep the caller's other XLA flags; this script decides the device count
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g; s/  +/ /g; s/^ //; s/ $//')"
export XLA_FLAGS="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export PYTHONUNBUFFERED=1

cmd_for() {  # cmd_for ID ARGS...: the argv of process ID, in the global array `cmd`
  local id="$1"
  shift
  cmd=("$python" -m jaxlm.cli "$@")
  if (( num > 1 )); then  # one process alone needs no coordinator
    cmd+=(--coordinator "127.0.0.1:$port" --num-processes "$num" --process-id "$id")
  fi
}

if (( dry )); then
  echo "export XLA_FLAGS=$(printf '%q' "$XLA_FLAGS") JAX_PLATFORMS=$JAX_PLATFORMS"
  for ((i = 0; i < num; i++)); do
    cmd_for "$i" "$@"
    printf '%q ' "${cmd[@]}"
    echo "> $logs/process-$i.log 2>&1 &"
  done
  exit 0
fi

mkdir -p "$logs"
pids=()
stop_all() {  # stop the processes this script started that are still running
  local p
  for p in "${pids[@]}"; do
    if [[ -n "$p" ]]; then kill -TERM "$p" 2>/dev/null || true; fi
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num; i++)); do
  cmd_for "$i" "$@"
  log="$logs/process-$i.log"
  if (( i == 0 && ! quiet )); then
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  pids+=("$!")
done
echo "local.sh: $num processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $logs" >&2

start=$SECONDS
rcs=()
first_fail=-1
left=$num
while (( left > 0 )); do
  for i in "${!pids[@]}"; do
    p="${pids[$i]}"
    [[ -z "$p" ]] && continue
    if kill -0 "$p" 2>/dev/null; then continue; fi
    rc=0
    wait "$p" || rc=$?
    rcs[i]=$rc
    pids[i]=""
    left=$((left - 1))
    if (( rc != 0 && first_fail < 0 )); then
      first_fail=$i
      echo "local.sh: process $i failed (exit $rc); stopping the others. Log: $logs/process-$i.log" >&2
      stop_all
    fi
  done
  if (( timeout > 0 && SECONDS - start > timeout && left > 0 )); then
    echo "local.sh: timed out after ${timeout}s; stopping all processes" >&2
    stop_all
    timeout=0
    if (( first_fail < 0 )); then first_fail=-2; fi
  fi
  if (( left > 0 )); then sleep 0.2; fi
done
wait  # the tee of process 0

for i in "${!rcs[@]}"; do
  echo "local.sh: process $i exit ${rcs[$i]} ($logs/process-$i.log)" >&2
done
if (( first_fail == -2 )); then exit 124; fi
if (( first_fail >= 0 )); then exit "${rcs[$first_fail]}"; fi
exit 0
