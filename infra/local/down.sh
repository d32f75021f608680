#!/usr/bin/env bash
# Stops the local stack that infra/local/up.sh started from the same state dir (DDPM_LOCAL_STACK_DIR,
# default <repo>/.local-stack), and nothing else: no `ray stop`, which would stop every Ray on the machine.
#
# up.sh started each service as the leader of a new session and recorded its pid and start time. Every
# process of the service is in that session (Ray's workers too, though they run in process groups of their
# own). The leader gets SIGTERM first and shuts its service down in order (`ray start --block` stops the
# raylet, GCS and dashboard; signalling them all at once can leave it hung); whatever of the session is
# left after the grace period gets SIGTERM, then SIGKILL. Ray job drivers run in sessions of their own;
# Ray kills them once their supervisor on the head is gone.
# The state dir stays: logs, the MLflow store and the token serve the next up.sh (or `rm -rf` it).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${DDPM_LOCAL_STACK_DIR:-$(cd "$HERE/../.." && pwd)/.local-stack}
GRACE=${DDPM_LOCAL_STACK_GRACE:-30}

session() { pgrep -s "$1" || true; }

# Signals the session's processes until none is left or `seconds` have passed; true if none is left.
signal_until_gone() {
  local sid=$1 signal=$2 deadline=$((SECONDS + $3)) members
  while members=$(session "$sid") && [[ -n $members ]]; do
    ((SECONDS < deadline)) || return 1
    # Members appear while Ray shuts down (workers restarting): signal each round's list.
    kill "-$signal" $members 2>/dev/null || true
    sleep 0.5
  done
}

stop() {
  local name=$1 pidfile=$STATE/pids/$1.pid
  [[ -f $pidfile ]] || return 0
  local pid
  pid=$(<"$pidfile")
  # A live leader with another start time is a recycled pid, and its session is not ours. (While any process
  # of our session lives, the kernel does not hand its id out as a new pid.)
  if ps -p "$pid" >/dev/null && [[ "$(ps -o lstart= -p "$pid")" != "$(<"$STATE/pids/$name.started")" ]]; then
    echo "down.sh: pid $pid is no longer $name; leaving it alone" >&2
  elif [[ -n $(session "$pid") ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + GRACE))
    while [[ -n $(session "$pid") ]] && ((SECONDS < deadline)); do sleep 0.5; done
    if ! signal_until_gone "$pid" TERM 10; then
      echo "down.sh: $name did not stop on SIGTERM; sending SIGKILL" >&2
      signal_until_gone "$pid" KILL 10 || echo "down.sh: $name: processes $(session "$pid") survive" >&2
    fi
    echo "stopped $name (session $pid)"
  fi
  rm -f "$pidfile" "$STATE/pids/$name.started"
}

# Ray first: its jobs may be writing to MLflow and S3.
for name in ray mlflow s3; do stop "$name"; done
