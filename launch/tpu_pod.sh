#!/usr/bin/env bash
# jaxlm on a Cloud TPU VM slice (or several slices): create or reuse the TPU, copy the code to every
# worker, install jaxlm[tpu] there, and run the same `jaxlm train` on all workers at once
# (`--worker=all`). JAX's multi-controller runtime finds its peers from the TPU metadata; each host
# feeds its own chips. Checkpoints and TensorBoard logs go to a gs:// directory.
#
#   launch/tpu_pod.sh up --name my-v5e --zone us-west4-a --type v5litepod-16 \
#       --config configs/quickstart.py --gcs gs://my-bucket/jaxlm -- --config.train.steps=1000
#   launch/tpu_pod.sh logs   --name my-v5e --zone us-west4-a        # per-worker logs -> launch_logs/
#   launch/tpu_pod.sh stop   --name my-v5e --zone us-west4-a        # stop training, keep the TPU
#   launch/tpu_pod.sh delete --name my-v5e --zone us-west4-a
#
# --dry-run prints every gcloud command instead of running it. Run with --help for all options.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh ACTION --name NAME --zone ZONE [options] [-- JAXLM_TRAIN_ARGS...]

actions:
  up       create (or reuse) the TPU, copy + install, train            (create + setup + train)
  create   create the TPU VM slice, or reuse it if it exists
  setup    copy the working tree (or --wheel) to all workers and pip install jaxlm[tpu] there
  train    run `jaxlm train` on all workers (needs --run-name of a setup unless part of `up`)
  logs     copy every worker's log to the local --logs directory
  stop     stop the training processes on all workers (the TPU stays)
  delete   delete the TPU (and its queued resource)
  status   describe the TPU

options:
  --name NAME          TPU VM name (with --num-slices > 1: queued resource NAME, nodes NAME-0, NAME-1, ...)
  --zone ZONE          e.g. us-west4-a (v5e), us-east5-a (v5p)
  --project PROJECT    default: gcloud's configured project
  --type TYPE          accelerator type for create: v5litepod-16 (v5e-16), v5p-64, v4-32, v6e-16, ...
  --version VERSION    TPU runtime version (default from --type: v5litepod -> v2-alpha-tpuv5-lite,
                       v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e, v4 -> tpu-ubuntu2204-base)
  --queued             create through a queued resource and wait until it is ACTIVE
  --num-slices N       N slices joined over the data-centre network (implies --queued); set
                       --config.parallel.dcn_data (or dcn_fsdp) so that their product is N
  --spot               spot (preemptible) capacity
  --source DIR         working tree to copy (default: this repository; git-tracked and untracked,
                       non-ignored files)
  --wheel FILE         install this wheel instead of copying a working tree
  --pip "PKGS"         extra packages installed with jaxlm[tpu] (default: "gcsfs google-cloud-storage",
                       the gs:// backends of Orbax/etils and TensorBoard)
  --command CMD        the jaxlm subcommand the workers run: train (default) or align
  --config SPEC        jaxlm config: a local .py file (copied to the workers) or a packaged name,
                       optionally :ARG
  --gcs DIR            gs://bucket/path: log.dir = DIR/RUN, checkpoint.dir = DIR/RUN/checkpoints
  --run-name RUN       remote directory ~/jaxlm/RUN and the gs:// subdirectory (default NAME-DATE)
  --logs DIR           local directory for per-worker logs (default launch_logs/RUN)
  --detach             start training in the background on the workers and return at once
  --internal-ip        ssh/scp over internal IPs (when this machine is in the TPU's VPC)
  --dry-run            print the commands, run nothing
  -h, --help           this help

Everything after `--` is passed to `jaxlm train` (or --command's subcommand): overrides, --resume, --init.
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
action="$1"
shift
case "$action" in
  up|create|setup|train|logs|stop|delete|status) ;;
  -h|--help) usage; exit 0 ;;
  *) die "unknown action '$action' (up, create, setup, train, logs, stop, delete, status)" ;;
esac

name="" zone="" project="" type="" version="" queued=0 slices=1 spot=0
source_dir="" wheel="" pip_extra="gcsfs google-cloud-storage" config="" gcs="" run="" logs=""
detach=0 internal_ip=0 dry=0 run_given=""
train_args=()
command=train
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_arg "$@"; name="$2"; shift 2 ;;
    --zone) need_arg "$@"; zone="$2"; shift 2 ;;
    --project) need_arg "$@"; project="$2"; shift 2 ;;
    --type|--accelerator-type) need_arg "$@"; type="$2"; shift 2 ;;
    --version|--runtime-version) need_arg "$@"; version="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --num-slices) need_arg "$@"; slices="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --source) need_arg "$@"; source_dir="$2"; shift 2 ;;
    --wheel) need_arg "$@"; wheel="$2"; shift 2 ;;
    --pip) [[ $# -ge 2 ]] || die "--pip needs a value ('' for none)"; pip_extra="$2"; shift 2 ;;
    --config) need_arg "$@"; config="$2"; shift 2 ;;
    --command) need_arg "$@"; command="$2"; shift 2 ;;
    --gcs) need_arg "$@"; gcs="${2%/}"; shift 2 ;;
    --run-name) need_arg "$@"; run="$2"; run_given="$2"; shift 2 ;;
    --logs) need_arg "$@"; logs="$2"; shift 2 ;;
    --detach) detach=1; shift ;;
    --internal-ip) internal_ip=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option '$1' (jaxlm train arguments go after --)" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$slices'"
if (( slices > 1 )); then queued=1; fi
[[ "$command" == train || "$command" == align ]] || die "--command must be train or align, got '$command'"
if [[ -z "$run" ]]; then
  [[ "$action" == train ]] && die "train needs --run-name (the one setup printed); 'up' makes one"
  run="$name-$(date +%Y%m%d-%H%M%S)"
fi
[[ "$run" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name may only hold letters, digits, '.', '_' and '-'"
if [[ -z "$run_given" && ( "$action" == logs || "$action" == stop ) ]]; then
  logs="${logs:-launch_logs/$name}"  # the latest run on the TPU: ~/jaxlm/current
fi
logs="${logs:-launch_logs/$run}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"
source_dir="${source_dir:-$(dirname "$here")}"

gflags=(--zone="$zone")
[[ -n "$project" ]] && gflags+=(--project="$project")
wflags=(--worker=all)
(( internal_ip )) && wflags+=(--internal-ip)

if (( slices > 1 )); then
  nodes=()
  for ((s = 0; s < slices; s++)); do nodes+=("$name-$s"); done
else
  nodes=("$name")
fi
rdir="jaxlm/$run"  # relative to the remote home directory

# ----------------------------------------------------------------------------- helpers
run_cmd() {  # print, then run unless --dry-run
  echo "+ $(show "$@")" >&2
  if (( ! dry )); then "$@"; fi
}
ssh_all() {  # ssh_all NODE COMMAND: run a shell command on every worker of NODE
  run_cmd gcloud compute tpus tpu-vm ssh "$1" "${gflags[@]}" "${wflags[@]}" \
    --strict-host-key-checking=no --command="$2"
}
scp_all() {  # scp_all SRC... DEST, with NODE: on the remote side
  run_cmd gcloud compute tpus tpu-vm scp "${gflags[@]}" "${wflags[@]}" --strict-host-key-checking=no "$@"
}
runtime_version() {
  if [[ -n "$version" ]]; then echo "$version"; return; fi
  case "$type" in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*|v3-*|v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for --type '$type': pass --version" ;;
  esac
}
exists() {  # the TPU (or queued resource) exists already; a dry run assumes it does not
  local what=(tpu-vm describe "$name")
  (( queued )) && what=(queued-resources describe "$name")
  echo "+ $(show gcloud compute tpus "${what[@]}" "${gflags[@]}" --format='value(name)')" >&2
  (( dry )) && return 1
  gcloud compute tpus "${what[@]}" "${gflags[@]}" --format='value(name)' >/dev/null 2>&1
}

# ----------------------------------------------------------------------------- actions
do_create() {
  if exists; then
    echo "tpu_pod.sh: $name exists in $zone; reusing it" >&2
    return
  fi
  [[ -n "$type" ]] || die "creating $name needs --type (e.g. v5litepod-16, v5p-64)"
  local rv
  rv="$(runtime_version)"
  if (( queued )); then
    local node_args=(--node-id="$name")
    (( slices > 1 )) && node_args=(--node-count="$slices" --node-prefix="$name")
    local extra=()
    (( spot )) && extra+=(--spot)
    run_cmd gcloud compute tpus queued-resources create "$name" "${gflags[@]}" "${node_args[@]}" \
      --accelerator-type="$type" --runtime-version="$rv" "${extra[@]}"
    echo "+ (poll: gcloud compute tpus queued-resources describe $name --format='value(state.state)' until ACTIVE)" >&2
    if (( ! dry )); then
      local state=""
      while [[ "$state" != ACTIVE ]]; do
        state="$(gcloud compute tpus queued-resources describe "$name" "${gflags[@]}" --format='value(state.state)')"
        case "$state" in
          FAILED|SUSPENDED) die "queued resource $name is $state" ;;
          ACTIVE) ;;
          *) echo "tpu_pod.sh: $name is ${state:-pending}; waiting" >&2; sleep 30 ;;
        esac
      done
    fi
  else
    local extra=()
    (( spot )) && extra+=(--spot)
    run_cmd gcloud compute tpus tpu-vm create "$name" "${gflags[@]}" --accelerator-type="$type" \
      --version="$rv" "${extra[@]}"
  fi
}

stage=""
cleanup() { if [[ -n "$stage" ]]; then rm -rf "$stage"; fi; }
trap cleanup EXIT

do_setup() {
  local payload install unpack
  if (( dry )); then stage="STAGING"; else stage="$(mktemp -d)"; fi
  if [[ -n "$wheel" ]]; then
    [[ -f "$wheel" ]] || die "wheel $wheel not found"
    (( dry )) || cp "$wheel" "$stage/"
    payload="$stage/$(basename "$wheel")"
    install="jaxlm[tpu] @ file://\$HOME/$rdir/$(basename "$wheel")"
    unpack="true"
  else
    [[ -f "$source_dir/pyproject.toml" ]] || die "$source_dir has no pyproject.toml (--source or --wheel)"
    payload="$stage/jaxlm-src.tar.gz"
    echo "+ (tar the working tree $source_dir into jaxlm-src.tar.gz: git-tracked + untracked, not ignored)" >&2
    if (( dry )); then
      :
    elif git -C "$source_dir" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git -C "$source_dir" ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do  # skip tracked files deleted in the working tree
            if [[ -e "$source_dir/$f" ]]; then printf '%s\0' "$f"; fi
          done \
        | tar -C "$source_dir" --null -T - -czf "$payload"
    else
      tar -C "$source_dir" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -czf "$payload" .
    fi
    install="jaxlm[tpu] @ file://\$HOME/$rdir/src"
    unpack="mkdir -p src && tar -xzf jaxlm-src.tar.gz -C src"
  fi
  local files=("$payload")
  local cfile="${config%%:*}"
  if [[ -n "$config" && -f "$cfile" ]]; then
    (( dry )) || cp "$cfile" "$stage/"
    files+=("$stage/$(basename "$cfile")")
  fi
  # one virtualenv per worker, ~/jaxlm/venv, with Python >= 3.11 (uv fetches one when the image's
  # python3 is older, as on the Ubuntu 22.04 TPU images)
  local venv="python3 -m pip install --user --upgrade uv && ~/.local/bin/uv venv --seed --allow-existing --python '>=3.11' ~/jaxlm/venv"
  local pip_cmd="\$HOME/jaxlm/venv/bin/python -m pip install --upgrade \"$install\" $pip_extra"
  for node in "${nodes[@]}"; do
    ssh_all "$node" "mkdir -p ~/$rdir && ln -sfn ~/$rdir ~/jaxlm/current"
    scp_all "${files[@]}" "$node:$rdir/"
    ssh_all "$node" "cd ~/$rdir && $unpack && $venv && $pip_cmd"
  done
  echo "tpu_pod.sh: set up run $run on ${nodes[*]}" >&2
}

train_command() {  # the jaxlm command every worker of slice $1 runs
  local spec="$config"
  local cfile="${config%%:*}"
  [[ -n "$config" ]] || die "train needs --config"
  if [[ -f "$cfile" ]]; then spec="$(basename "$cfile")${config#"$cfile"}"; fi
  local args=(jaxlm "$command" --config "$spec")
  if [[ -n "$gcs" ]]; then
    [[ "$gcs" == gs://* ]] || die "--gcs must be a gs:// path, got '$gcs'"
    args+=("--config.log.dir=$gcs/$run" "--config.checkpoint.dir=$gcs/$run/checkpoints")
  else
    echo "tpu_pod.sh: warning: no --gcs: checkpoints stay on each worker's disk, which multi-host" \
      "Orbax cannot share; pass --gcs gs://bucket/path" >&2
  fi
  args+=("${train_args[@]}")
  printf '%q ' "${args[@]}" | sed 's/ $//'
}

remote_train() {  # the shell script each worker of slice $1 runs
  local cmd worker log
  cmd="$(train_command)"
  # the worker number of this host in its slice, from the TPU VM metadata
  worker="\$(curl -sf -H 'Metadata-Flavor: Google' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
  log="logs/slice-$1-worker-$worker.log"
  local pre="cd ~/$rdir && mkdir -p logs && export PATH=\"\$HOME/jaxlm/venv/bin:\$PATH\" && sudo rm -f /tmp/libtpu_lockfile; LOG=$log"
  if (( detach )); then
    echo "$pre; setsid nohup $cmd > \"\$LOG\" 2>&1 < /dev/null & echo \$! > train.pid; echo \"started pid \$(cat train.pid), log \$LOG\""
  else
    echo "$pre; $cmd > \"\$LOG\" 2>&1 & pid=\$!; echo \$pid > train.pid; tail -n +1 --pid=\$pid -f \"\$LOG\"; wait \$pid"
  fi
}

do_logs() {
  local dir="${1:-current}"
  run_cmd mkdir -p "$logs"
  for node in "${nodes[@]}"; do
    scp_all "$node:jaxlm/$dir/logs/*" "$logs/"
  done
  echo "tpu_pod.sh: worker logs in $logs" >&2
}

do_train() {
  local rc=0 pids=() s
  run_cmd mkdir -p "$logs"
  for ((s = 0; s < ${#nodes[@]}; s++)); do
    if (( ${#nodes[@]} == 1 || dry )); then
      ssh_all "${nodes[$s]}" "$(remote_train "$s")" || rc=$?
    else  # slices in parallel; each slice's combined output to its own file
      ssh_all "${nodes[$s]}" "$(remote_train "$s")" > "$logs/ssh-slice-$s.log" 2>&1 &
      pids+=("$!")
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  if (( ! detach )); then do_logs "$run" || true; fi
  if (( rc != 0 )); then echo "tpu_pod.sh: training failed (exit $rc); see $logs" >&2; fi
  return "$rc"
}

do_stop() {
  local dir="${run_given:-current}"
  for node in "${nodes[@]}"; do
    # TERM the recorded training process, give it a minute to exit, then KILL it; free the TPU lock
    ssh_all "$node" "if cd ~/jaxlm/$dir 2>/dev/null && [ -f train.pid ]; then pid=\$(cat train.pid); kill \$pid 2>/dev/null; for i in \$(seq 60); do kill -0 \$pid 2>/dev/null || break; sleep 1; done; kill -9 \$pid 2>/dev/null; rm -f train.pid; fi; sudo rm -f /tmp/libtpu_lockfile; true"
  done
}

do_delete() {
  if (( queued )); then
    run_cmd gcloud compute tpus queued-resources delete "$name" "${gflags[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$name" "${gflags[@]}" --quiet
  fi
}

do_status() {
  if (( queued )); then run_cmd gcloud compute tpus queued-resources describe "$name" "${gflags[@]}"; fi
  for node in "${nodes[@]}"; do run_cmd gcloud compute tpus tpu-vm describe "$node" "${gflags[@]}"; done
}

case "$action" in
  up) do_create; do_setup; do_train ;;
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  logs) do_logs "${run_given:-current}" ;;
  stop) do_stop ;;
  delete) do_delete ;;
  status) do_status ;;
esac
