# Helpers sourced by the launchers (tpu_pod.sh, gpu_slurm.sh); not run on its own.
# shellcheck shell=bash

show() {  # the command as one copy-pasteable line: words quoted only when they need it
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+="$w "; else out+="'${w//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
