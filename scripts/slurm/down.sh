#!/usr/bin/env bash
# Stop the single-node test cluster started by scripts/slurm/up.sh, by its PID files.
#   scripts/slurm/down.sh               # slurmd, slurmctld, munged
#   scripts/slurm/down.sh --keep-munge  # leave munged running
#   scripts/slurm/down.sh --purge       # ... and delete $PRUNEREP_SLURM_DIR
set -uo pipefail
DIR="${PRUNEREP_SLURM_DIR:-/tmp/prunerep-slurm}"
KEEP_MUNGE=0; PURGE=0
for a in "$@"; do
  case "$a" in --keep-munge) KEEP_MUNGE=1 ;; --purge) PURGE=1 ;; *) echo "unknown option $a" >&2; exit 2 ;; esac
done

stop() {  # stop <name> <pidfile>
  local name="$1" pidfile="$2" pid
  [[ -s "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    echo "[slurm-down] stopping $name (pid $pid)" >&2
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; fi
  fi
  rm -f "$pidfile"
}

if [[ -f "$DIR/slurm.conf" ]] && command -v scancel >/dev/null; then
  SLURM_CONF="$DIR/slurm.conf" timeout 10 scancel --user=root >/dev/null 2>&1 || true
fi
stop slurmd "$DIR/slurmd.pid"
stop slurmctld "$DIR/slurmctld.pid"
[[ $KEEP_MUNGE == 1 ]] || stop munged "$DIR/munge/munged.pid"
if [[ $PURGE == 1 ]]; then rm -rf "$DIR"; fi
exit 0
