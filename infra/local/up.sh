#!/usr/bin/env bash
# A local ddpm-ray stack on loopback, shaped like the cluster: a Ray head (job API and dashboard, token
# authentication on), an MLflow server (SQLite store, local artifacts, served by the server; MLflow's
# basic-auth app on, the exports log in as its admin) and an S3 endpoint (moto's standalone server). The job
# API, the dashboard, MLflow and S3 listen on 127.0.0.1 only, and so do Ray's internal servers (GCS, raylet,
# agents, workers): Ray's single-machine mode, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in env.sh, keeps the node's
# address 127.0.0.1 (docs/roles.md, "Local Ray"). Clients that join by the GCS address need it too: source env.sh.
#
#   . .venv/bin/activate           # the project venv provides ray, mlflow and moto_server (or: VENV=.venv)
#   infra/local/up.sh              # prints the exports, also written to <state>/env.sh
#   . .local-stack/env.sh
#   ray job submit --working-dir . -- python pipelines/train.py --preset demo --data s3://... --workers 2
#   infra/local/down.sh            # stops what up.sh started, and nothing else
#
# Settings, from the environment:
#   DDPM_LOCAL_STACK_DIR     state: pids, logs, token, MLflow store and admin password, env.sh
#                            (default <repo>/.local-stack)
#   DDPM_RAY_PORT            Ray GCS (default 6379)       DDPM_RAY_DASHBOARD_PORT  job API (default 8265)
#   DDPM_MLFLOW_PORT         MLflow (default 5000)        DDPM_S3_PORT             S3 endpoint (default 9000)
#   DDPM_RAY_NUM_CPUS        Ray's logical CPUs (default: the cores, at least 4, so that DDP workers and
#                            their data loading fit on a small machine)
#   DDPM_LOCAL_STACK_TIMEOUT seconds each service may take to answer (default 120)
#   VENV, PYTHON             a virtualenv to put first on PATH; the Python that runs helpers (python3)
# Ray's other ports (node manager, object manager, agents, metrics, client server) are free ports picked
# here, so the stack coexists with other Ray clusters on the machine.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${DDPM_LOCAL_STACK_DIR:-$REPO/.local-stack}
if [[ -n ${VENV:-} ]]; then PATH="$(cd "$VENV" && pwd)/bin:$PATH"; fi
PYTHON=${PYTHON:-python3}
RAY_PORT=${DDPM_RAY_PORT:-6379}
DASHBOARD_PORT=${DDPM_RAY_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${DDPM_MLFLOW_PORT:-5000}
S3_PORT=${DDPM_S3_PORT:-9000}
TIMEOUT=${DDPM_LOCAL_STACK_TIMEOUT:-120}
# moto accepts any credentials; these exist so that boto3 signs requests. They are not AWS keys.
MOTO_CREDENTIAL=moto-local-dummy

fail() {
  echo "up.sh: $*" >&2
  echo "up.sh: stopping what was started; logs stay in $STATE/logs" >&2
  DDPM_LOCAL_STACK_DIR=$STATE "$HERE/down.sh" >&2 || true
  exit 1
}

for tool in "$PYTHON" ray mlflow moto_server; do
  command -v "$tool" >/dev/null || {
    echo "up.sh: '$tool' not found: activate the project venv (. .venv/bin/activate) or set VENV=.venv" >&2
    exit 1
  }
done

mkdir -p "$STATE"/pids "$STATE"/logs "$STATE"/mlflow
STATE=$(cd "$STATE" && pwd)
if [[ $STATE == *[[:space:]]* ]]; then
  echo "up.sh: the state dir may not have spaces in its path (it goes into URIs and env.sh): $STATE" >&2
  exit 1
fi
for pidfile in "$STATE"/pids/*.pid; do
  if [[ -e $pidfile ]] && pgrep -s "$(<"$pidfile")" >/dev/null; then
    echo "up.sh: a stack is already running from $STATE (see $pidfile); run infra/local/down.sh first" >&2
    exit 1
  fi
done

# Ports: the four fixed ones must be free; Ray's internal ones are picked free and distinct from them.
"$PYTHON" - "$RAY_PORT" "$DASHBOARD_PORT" "$MLFLOW_PORT" "$S3_PORT" <<'EOF' || exit 1
import socket, sys
for port in sys.argv[1:]:
    with socket.socket() as sock:
        # As servers do: connections of a stopped server in TIME_WAIT do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", int(port)))
        except OSError as error:
            sys.exit(f"up.sh: port {port} on 127.0.0.1 is not free ({error.strerror}); choose others with "
                     "DDPM_RAY_PORT, DDPM_RAY_DASHBOARD_PORT, DDPM_MLFLOW_PORT, DDPM_S3_PORT")
EOF
read -r -a RAY_PORTS < <("$PYTHON" - 7 "$RAY_PORT" "$DASHBOARD_PORT" "$MLFLOW_PORT" "$S3_PORT" <<'EOF'
import socket, sys
wanted, taken, held = int(sys.argv[1]), set(sys.argv[2:]), []
while len(held) < wanted:  # keep every socket bound until all are chosen, so the ports are distinct
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    if str(sock.getsockname()[1]) in taken:
        sock.close()
    else:
        held.append(sock)
print(" ".join(str(sock.getsockname()[1]) for sock in held))
EOF
)
NUM_CPUS=${DDPM_RAY_NUM_CPUS:-$("$PYTHON" -c 'import os; print(max(4, os.cpu_count() or 1))')}

# The Ray token lives with the stack, not in ~/.ray/auth_token, which other clusters on the machine use.
if [[ ! -s $STATE/auth_token ]]; then
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token")
fi
# MLflow's admin is created with this password on the first start against an empty user store, and keeps it
# (MLflow ignores the setting once the admin exists): a user store without its password file is unusable.
MLFLOW_PASSWORD_FILE=$STATE/mlflow/admin_password
if [[ ! -s $MLFLOW_PASSWORD_FILE ]]; then
  if [[ -e $STATE/mlflow/basic_auth.db ]]; then
    echo "up.sh: $STATE/mlflow/basic_auth.db has an MLflow admin whose password file ($MLFLOW_PASSWORD_FILE) is" \
      "gone; remove basic_auth.db to start with a new admin (runs and models stay)" >&2
    exit 1
  fi
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$MLFLOW_PASSWORD_FILE")
fi
cat >"$STATE/mlflow/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$STATE/mlflow/basic_auth.db
admin_username = admin
EOF

# Ray's unix sockets live under its temp dir (<temp>/session_<date>_<pid>/sockets/dash_MetricsHead: 68 bytes
# more), and a socket path may not exceed 103 bytes (macOS; 107 on Linux): a state dir with a long path
# gets a short temp dir in /tmp (one per state dir), linked from the state dir.
RAY_TEMP=$STATE/ray
if (( ${#RAY_TEMP} > 32 )); then
  RAY_TEMP=/tmp/ddpm-ray-$(printf %s "$STATE" | cksum | cut -d' ' -f1)
  mkdir -p "$RAY_TEMP"
  ln -sfn "$RAY_TEMP" "$STATE/ray"
fi

RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
cat >"$STATE/env.sh" <<EOF
export RAY_ADDRESS=$RAY_ADDRESS
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD="\$(cat $MLFLOW_PASSWORD_FILE)"
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=$MOTO_CREDENTIAL
export AWS_SECRET_ACCESS_KEY=$MOTO_CREDENTIAL
export AWS_DEFAULT_REGION=us-east-1
EOF

# Each service runs in its own session, whose processes are all its own (Ray's raylet, GCS, agents and
# workers; MLflow's web workers): down.sh stops exactly those.
start() {
  local name=$1
  shift
  "$PYTHON" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
    >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name.pid"
  # With the pid, its start time: down.sh never signals a recycled pid.
  ps -o lstart= -p $! >"$STATE/pids/$name.started"
}

# Polls `$@` until it succeeds; fails early if the service died, or after TIMEOUT seconds.
wait_for() {
  local name=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >>"$STATE/logs/$name-probe.log" 2>&1; do
    kill -0 "$(<"$STATE/pids/$name.pid")" 2>/dev/null \
      || fail "$name exited while starting; end of $STATE/logs/$name.log:"$'\n'"$(tail -n 20 "$STATE/logs/$name.log")"
    ((SECONDS < deadline)) \
      || fail "$name did not answer within ${TIMEOUT}s; see $STATE/logs/$name.log and $name-probe.log"
    sleep 1
  done
}

http_ok() {
  "$PYTHON" -c '
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=5)
except OSError as error:
    sys.exit(f"{sys.argv[1]}: {error}")' "$1"
}

# Ready means a job runs: the job agent registers some seconds after the dashboard answers.
ray_job_runs() {
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token" ray job submit --address "$RAY_ADDRESS" -- python -c pass
}

# All three start at once; Ray only needs their addresses, not their answers.
start s3 moto_server -H 127.0.0.1 -p "$S3_PORT"
# The secrets reach MLflow through its environment, never its command line. (MLflow's job runner, for GenAI
# evaluation jobs, is of no use here: seven processes fewer.)
(
  export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_AUTH_CONFIG_PATH=$STATE/mlflow/basic_auth.ini
  MLFLOW_AUTH_ADMIN_PASSWORD=$(<"$MLFLOW_PASSWORD_FILE")
  # Signs the UI's CSRF tokens; one worker, so a new one at each start does.
  MLFLOW_FLASK_SERVER_SECRET_KEY=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')
  export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
  start mlflow mlflow server --app-name basic-auth --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow/mlflow.db" --artifacts-destination "$STATE/mlflow/artifacts"
)
# Ray runs with the stack's environment, as cluster nodes run with theirs: jobs, tasks and actors see the
# S3 endpoint, MLflow and the token, and `python` in an entrypoint is the first one on this PATH.
# --block keeps `ray start` running as the head's parent: terminating it stops the head.
(
  . "$STATE/env.sh"
  start ray ray start --head --block --disable-usage-stats \
    --node-ip-address=127.0.0.1 --port="$RAY_PORT" --num-cpus="$NUM_CPUS" --temp-dir="$RAY_TEMP" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --node-manager-port="${RAY_PORTS[0]}" --object-manager-port="${RAY_PORTS[1]}" \
    --ray-client-server-port="${RAY_PORTS[2]}" --dashboard-agent-listen-port="${RAY_PORTS[3]}" \
    --dashboard-agent-grpc-port="${RAY_PORTS[4]}" --runtime-env-agent-port="${RAY_PORTS[5]}" \
    --metrics-export-port="${RAY_PORTS[6]}"
)
wait_for s3 http_ok "$AWS_ENDPOINT_URL/moto-api/"
wait_for mlflow http_ok "$MLFLOW_TRACKING_URI/health"
wait_for ray ray_job_runs

echo "# ddpm-ray local stack in $STATE; stop it with: DDPM_LOCAL_STACK_DIR=$STATE $HERE/down.sh"
cat "$STATE/env.sh"
