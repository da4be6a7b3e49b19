#!/usr/bin/env bash
# Submit launch/gpu_slurm.sbatch: jaxlm train on N nodes of G GPUs, one task per node (default) or
# one task per GPU (--per-gpu); with --gpus-per-node 0, CPU tasks (--tasks-per-node of them).
#
#   launch/gpu_slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --requeue -- \
#       --config configs/quickstart.py --config.parallel.fsdp=16 --config.log.dir=/shared/runs/q1
#
# Every job gets SIGTERM 60 s before its time limit (--signal=TERM@60): the tasks save a checkpoint
# and stop. With --requeue such a job (or one preempted, or sent `scancel --signal=TERM`) requeues
# itself and the requeued run resumes from that checkpoint.
#
# --dry-run prints the sbatch command and what each task will run. Run with --help for all options.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh [options] -- JAXLM_TRAIN_ARGS...

options:
  --nodes N            nodes (default 2)
  --gpus-per-node G    GPUs per node (default 8); 0: CPU tasks, no GPUs requested
  --per-gpu            one task (process) per GPU instead of one per node
  --tasks-per-node N   N tasks (processes) per node (default 1, or G with --per-gpu)
  --requeue            when the tasks stop on SIGTERM (time limit, preemption, scancel --signal=TERM)
                       after saving a checkpoint, requeue the job; the requeued run resumes from it
                       (sbatch --requeue --open-mode=append; the logs keep every run)
  --partition P        SLURM partition
  --account A          SLURM account
  --time T             time limit (default 24:00:00)
  --job-name NAME      (default jaxlm)
  --command CMD        the jaxlm subcommand every task runs: train (default) or align
  --logs DIR           DIR/slurm-JOBID.out (the batch log) and DIR/slurm-JOBID/task-N.log
                       (one per task); default launch_logs
  --env FILE           file each job sources before running (e.g. .venv/bin/activate)
  --port PORT          coordinator port on the first node (default: derived from the job id)
  --sbatch-arg ARG     extra sbatch argument (repeatable), e.g. --sbatch-arg=--qos=high
  --dry-run            print the commands, submit nothing
  -h, --help           this help

Everything after `--` goes to `jaxlm train` (or --command's subcommand): --config FILE, overrides, --init. The checkpoint and log
directories must be on storage every node sees (a shared file system or gs://). SIGTERM comes 60 s before
the time limit; give more time for large checkpoints with --sbatch-arg=--signal=TERM@300.
EOF
}

die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }

nodes=2 gpus=8 per_gpu=0 tasks_per_node="" requeue=0 partition="" account="" time_limit="24:00:00" job_name=jaxlm
logs="" env_file="" port="" dry=0 command=train
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --per-gpu) per_gpu=1; shift ;;
    --tasks-per-node) tasks_per_node="$2"; shift 2 ;;
    --requeue) requeue=1; shift ;;
    --partition) partition="$2"; shift 2 ;;
    --account) account="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
    --command) command="$2"; shift 2 ;;
    --logs) logs="$2"; shift 2 ;;
    --env) env_file="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --sbatch-arg) extra+=("$2"); shift 2 ;;
    --sbatch-arg=*) extra+=("${1#--sbatch-arg=}"); shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (jaxlm train arguments go after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no jaxlm train arguments after -- (at least --config FILE)"
[[ "$command" == train || "$command" == align ]] || die "--command must be train or align, got '$command'"
for v in "$nodes" ${tasks_per_node:+"$tasks_per_node"}; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$v'"
done
[[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus-per-node: expected a number (0 for CPU tasks), got '$gpus'"
(( per_gpu && gpus == 0 )) && die "--per-gpu needs GPUs: with --gpus-per-node 0 use --tasks-per-node N"
(( per_gpu )) && [[ -n "$tasks_per_node" && "$tasks_per_node" != "$gpus" ]] && \
  die "--per-gpu runs $gpus tasks per node; --tasks-per-node $tasks_per_node contradicts it"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$here/common.sh"
if [[ -z "$tasks_per_node" ]]; then
  tasks_per_node=1
  (( per_gpu )) && tasks_per_node="$gpus"
fi
logs="${logs:-launch_logs}"

sb=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
    --gpus-per-node="$gpus" --time="$time_limit" --signal=TERM@60 --output="$logs/slurm-%j.out")
(( requeue )) && sb+=(--requeue --open-mode=append)
[[ -n "$partition" ]] && sb+=(--partition="$partition")
[[ -n "$account" ]] && sb+=(--account="$account")
sb+=("${extra[@]}")
exports="ALL,JAXLM_LOG_ROOT=$logs,JAXLM_COMMAND=$command"
[[ -n "$env_file" ]] && exports+=",JAXLM_ENV=$(cd "$(dirname "$env_file")" && pwd)/$(basename "$env_file")"
[[ -n "$port" ]] && exports+=",JAXLM_PORT=$port"
(( requeue )) && exports+=",JAXLM_REQUEUE=1"
sb+=(--export="$exports")
sb+=("$here/gpu_slurm.sbatch" "$@")

if (( dry )); then
  echo "+ $(show "${sb[@]}")"
  echo "# $nodes node(s) x $tasks_per_node task(s) = $((nodes * tasks_per_node)) processes; in the job:"
  JAXLM_DRY_RUN=1 JAXLM_LOG_ROOT="$logs" JAXLM_COMMAND="$command" JAXLM_PORT="$port" JAXLM_ENV="" \
    JAXLM_REQUEUE="$requeue" bash "$here/gpu_slurm.sbatch" "$@"
  exit 0
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
mkdir -p "$logs"  # SLURM does not create the batch log's directory
"${sb[@]}"
