#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and demos of launch/gpu_slurm.sh: installs
# slurm-wlm and munge when missing (apt), writes slurm.conf / cgroup.conf / a fresh munge key under a
# prefix, and starts munged, slurmctld and slurmd there. Nothing outside the prefix is configured: the
# daemons use their own munge socket, spool, pid and log files, and `down` stops them by those pids.
#
#   sudo launch/slurm_local.sh up                 # ~5 s when installed, ~1 min with the install
#   export SLURM_CONF=/tmp/jaxlm-slurm/etc/slurm.conf
#   launch/gpu_slurm.sh --nodes 1 --gpus-per-node 0 --tasks-per-node 2 --env .venv/bin/activate \
#       -- --config configs/quickstart.py --config.data.num_shards=2
#   launch/slurm_local.sh status                  # daemons, sinfo, squeue
#   launch/slurm_local.sh down                    # cancel the jobs, stop the daemons (logs stay)
#
# It needs root (slurmd starts jobs as their users) and, to install, apt-get (Debian, Ubuntu).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm_local.sh up|down|status [options]

actions:
  up       install slurm-wlm and munge when missing, write the configs, start munged, slurmctld
           and slurmd, wait until the node is idle (nothing is done when the cluster is already up)
  down     cancel this cluster's jobs and stop its daemons (the logs stay in PREFIX/log)
  status   the daemons, sinfo and squeue; exit status 0 when the cluster answers, 1 otherwise

options:
  --prefix DIR   where configs, state, sockets and logs go
                 (default: $JAXLM_SLURM_PREFIX, else /tmp/jaxlm-slurm)
  --cpus N       CPUs the node offers (default: all of this machine's)
  --no-install   fail instead of installing missing packages
  -h, --help     this help

Clients (sbatch, srun, squeue, scontrol) find the cluster through SLURM_CONF=PREFIX/etc/slurm.conf,
which `up` and `status` print. The node is called localhost, its partition `debug`; ports 6817/6818.
EOF
}

die() { echo "slurm_local.sh: $*" >&2; exit 2; }

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
action="$1"
shift
case "$action" in
  up|down|status) ;;
  -h|--help) usage; exit 0 ;;
  *) die "unknown action '$action' (up, down, status)" ;;
esac
prefix="${JAXLM_SLURM_PREFIX:-/tmp/jaxlm-slurm}" cpus="" install=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) [[ $# -ge 2 ]] || die "--prefix needs a value"; prefix="$2"; shift 2 ;;
    --cpus) [[ $# -ge 2 ]] || die "--cpus needs a value"; cpus="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done
[[ -z "$cpus" || "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus: expected a positive integer, got '$cpus'"
[[ "$prefix" == /* ]] || prefix="$PWD/$prefix"
conf="$prefix/etc/slurm.conf"
export SLURM_CONF="$conf"
ctld_port=6817 slurmd_port=6818
daemons=(slurmd slurmctld munged)  # stop order

pid_of() {  # pid_of NAME: the pid in NAME's pid file when that process is alive and is NAME
  local f="$prefix/run/$1.pid" p
  [[ -f "$f" ]] || return 1
  p="$(tr -dc 0-9 < "$f")"
  [[ -n "$p" && -r "/proc/$p/comm" ]] || return 1
  [[ "$(cat "/proc/$p/comm")" == "$1"* ]] || return 1  # not a recycled pid
  echo "$p"
}

answers() {  # the controller answers and the node takes jobs
  [[ -f "$conf" ]] || return 1
  timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  local state
  state="$(timeout 10 sinfo -h -n localhost -o %t 2>/dev/null)" || return 1
  [[ "$state" =~ ^(idle|mix|alloc|comp) ]]
}

stop() {  # cancel this cluster's jobs, stop the daemons by their pids
  local name p i
  if pid_of slurmctld >/dev/null; then
    local jobs
    jobs="$(timeout 10 squeue -h -o %i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      echo "slurm_local.sh: cancelling job(s) $(echo "$jobs" | tr '\n' ' ')" >&2
      # shellcheck disable=SC2086 # one id per word
      timeout 10 scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 60; i++)); do  # the steps end before slurmd goes, or they would linger
        [[ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]] && break
        sleep 0.5
      done
    fi
  fi
  for name in "${daemons[@]}"; do
    p="$(pid_of "$name")" || continue
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
      kill -0 "$p" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
    echo "slurm_local.sh: stopped $name (pid $p)" >&2
  done
}

status() {
  local name p up=0
  for name in munged slurmctld slurmd; do
    if p="$(pid_of "$name")"; then echo "$name: running (pid $p)"; else echo "$name: not running"; fi
  done
  if answers; then
    up=1
    sinfo
    squeue
  fi
  echo "prefix $prefix; logs in $prefix/log"
  if (( up )); then
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  echo "the cluster is not up"
  return 1
}

need_root() {
  if [[ "$(id -u)" != 0 ]]; then
    die "$1 needs root (slurmd starts jobs as their users; munged and slurmctld run as root here): run it with sudo"
  fi
}

install_packages() {
  local missing=() tool
  for tool in munged slurmctld slurmd sbatch srun; do
    command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null || missing+=("$tool")
  done
  (( ${#missing[@]} )) || return 0
  (( install )) || die "not installed: ${missing[*]} (install slurm-wlm and munge, or drop --no-install)"
  command -v apt-get >/dev/null || die "not installed: ${missing[*]}, and there is no apt-get here to install" \
    "them: install SLURM (slurmctld, slurmd, sbatch, srun) and munge with this system's package manager"
  echo "slurm_local.sh: installing slurm-wlm and munge (apt-get)" >&2
  if ! apt-get update -qq || ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurm-wlm munge >/dev/null; then
    die "apt-get could not install slurm-wlm and munge (its errors are above)"
  fi
}

port_busy() { (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_configs() {
  local mem
  cpus="${cpus:-$(nproc)}"
  mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10240 ))  # MB, with a margin
  rm -rf "${prefix:?}/etc" "$prefix/run" "$prefix/spool" "$prefix/munge"
  mkdir -p "$prefix"/{etc,run,log,spool/ctld,spool/d,munge}
  chmod 755 "$prefix" "$prefix/etc" "$prefix/munge"  # every user's sbatch reads slurm.conf, talks to munged
  # a fresh key: no other munged on this machine (or network) can talk to these daemons
  dd if=/dev/urandom of="$prefix/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$prefix/munge/munge.key"
  cat > "$conf" <<EOF
# written by launch/slurm_local.sh: a single-node cluster for tests and demos
ClusterName=jaxlm-local
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$prefix/munge/munge.socket.2
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
StateSaveLocation=$prefix/spool/ctld
SlurmdSpoolDir=$prefix/spool/d
SlurmctldPidFile=$prefix/run/slurmctld.pid
SlurmdPidFile=$prefix/run/slurmd.pid
SlurmctldLogFile=$prefix/log/slurmctld.log
SlurmdLogFile=$prefix/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  # slurmd loads a cgroup plugin even with proctrack/linuxproc (CgroupPlugin=disabled makes it fail);
  # nothing is constrained
  cat > "$prefix/etc/cgroup.conf" <<'EOF'
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
ConstrainCores=no
ConstrainRAMSpace=no
EOF
  chmod 644 "$conf" "$prefix/etc/cgroup.conf"
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll until CMD succeeds
  local limit="$1" what="$2" i
  shift 2
  for ((i = 0; i < limit * 4; i++)); do
    "$@" >/dev/null && return 0
    sleep 0.25
  done
  tail -n 20 "$prefix"/log/*.log >&2 || true
  stop
  echo "slurm_local.sh: $what did not come up within ${limit}s (the daemons' logs are above, and in $prefix/log)" >&2
  exit 1
}

up() {
  if answers; then
    echo "slurm_local.sh: the cluster in $prefix is already up" >&2
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  need_root up
  PATH="$PATH:/usr/sbin:/sbin"
  install_packages
  stop  # what is left of an earlier cluster in this prefix
  local port
  for port in "$ctld_port" "$slurmd_port"; do
    if port_busy "$port"; then
      die "port $port is in use: another SLURM (or an earlier cluster in another prefix) runs here; stop it first"
    fi
  done
  write_configs
  munged --force --socket="$prefix/munge/munge.socket.2" --key-file="$prefix/munge/munge.key" \
    --pid-file="$prefix/run/munged.pid" --log-file="$prefix/log/munged.log" --seed-file="$prefix/munge/munged.seed"
  wait_for 10 munged pid_of munged
  # the daemons fork into the background and write their own pid files
  slurmctld -f "$conf" >> "$prefix/log/slurmctld.out" 2>&1
  wait_for 20 slurmctld pid_of slurmctld
  slurmd -f "$conf" -N localhost >> "$prefix/log/slurmd.out" 2>&1
  wait_for 20 slurmd pid_of slurmd
  wait_for 60 "the node" answers
  echo "slurm_local.sh: up: node localhost ($cpus CPUs), partition debug; daemons' logs in $prefix/log" >&2
  echo "export SLURM_CONF=$conf"
}

case "$action" in
  up) up ;;
  down)
    if [[ -d "$prefix/run" ]]; then need_root down; fi
    stop
    rm -rf "$prefix/run" "$prefix/spool" "$prefix/munge"
    ;;
  status) status ;;
esac
