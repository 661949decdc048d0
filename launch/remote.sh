#!/usr/bin/env bash
# Runs on each Cloud TPU VM worker; launch/tpu.py calls it on all workers at once through
# `gcloud compute tpus tpu-vm ssh NAME --worker=all --command 'bash ~/metastone-jax/launch/remote.sh ...'`.
#
#   remote.sh install             tmux if missing, uv, a Python 3.11 venv in ~/metastone-jax/.venv,
#                                 pip install -e '.[tpu]', metastone-jax on the PATH
#   remote.sh run JOB CMD [ARG..] CMD in a detached tmux session named JOB (survives the SSH
#                                 session); output in ~/metastone-logs/JOB/worker-K.log
#   remote.sh tail JOB [N]        whether JOB still runs here, and the last N lines of its log
#   remote.sh stop JOB            SIGTERM to JOB's command (training saves a checkpoint and exits)
#   remote.sh mount BUCKET DIR    gcsfuse (installed if missing) mounts gs://BUCKET on DIR
#
# K is this worker's index (metadata attribute agent-worker-number; the hostname off a TPU VM).
# On a multi-worker slice `run` exports JAX_COORDINATOR_ADDRESS=<worker 0>:8482 (JAX's default
# TPU coordinator port), so metastone_jax.sharding.maybe_initialize_distributed() calls
# jax.distributed.initialize(), which reads the process count and id from the TPU metadata.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGS=${METASTONE_LOGS:-$HOME/metastone-logs}
MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes

meta() { curl -sf --max-time 5 -H Metadata-Flavor:Google "$MD/$1"; }
WORKER=$(meta agent-worker-number || hostname)

die() { echo "remote.sh (worker $WORKER): $*" >&2; exit 1; }

install() {
  cd "$REPO" || die "no $REPO"
  if ! command -v tmux >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq tmux || die "could not install tmux"
  fi
  export PATH=$HOME/.local/bin:$PATH
  if ! command -v uv >/dev/null; then
    python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  # The TPU images ship Python 3.10; metastone-jax needs 3.11+, which uv downloads.
  [ -x .venv/bin/python ] || uv venv -q --python 3.11 .venv || die "uv venv failed"
  uv pip install -q --python .venv/bin/python -e ".[tpu]" || die "pip install failed"
  sudo ln -sf "$REPO/.venv/bin/metastone-jax" /usr/local/bin/metastone-jax
  echo "worker $WORKER: installed $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')"
}

run() {
  local job=$1; shift
  [ $# -gt 0 ] || die "run: no command"
  tmux has-session -t "=$job" 2>/dev/null && die "job $job is already running (tail or stop it)"
  mkdir -p "$LOGS/$job"
  # One string for tmux's shell, every word quoted (printf %q), so CMD reaches _job unchanged.
  tmux new-session -d -s "$job" "$(printf '%q ' bash "${BASH_SOURCE[0]}" _job "$job" "$@")" ||
    die "tmux new-session failed"
  echo "worker $WORKER: started $job in tmux; log: tail -f $LOGS/$job/worker-$WORKER.log"
}

_job() {  # inside tmux: the command, its pid file, its log and its exit status
  local job=$1; shift
  local log=$LOGS/$job/worker-$WORKER.log pid=$LOGS/$job/worker-$WORKER.pid
  mkdir -p "$LOGS/$job"
  exec >>"$log" 2>&1
  local endpoints
  endpoints=$(meta worker-network-endpoints || true)
  if [[ -z ${JAX_COORDINATOR_ADDRESS:-} && $endpoints == *,* ]]; then
    # Entries are `name:id:ip` (or plain hostnames), worker 0 first.
    local first=${endpoints%%,*}
    export JAX_COORDINATOR_ADDRESS=${first##*:}:8482
  fi
  echo "[metastone] worker $WORKER $(date -u +%FT%TZ) start: $*"
  cd "$REPO" || exit 1
  export PATH=$HOME/.local/bin:$PATH  # uv, uvx
  # shellcheck disable=SC1091
  [ -f .venv/bin/activate ] && source .venv/bin/activate
  "$@" &
  echo $! >"$pid"
  wait $!
  local status=$?
  rm -f "$pid"
  echo "[metastone] worker $WORKER $(date -u +%FT%TZ) exit status $status"
  exit $status
}

tail_log() {
  local job=$1 n=${2:-20} log=$LOGS/$1/worker-$WORKER.log state
  if tmux has-session -t "=$job" 2>/dev/null; then state=running; else state="not running"; fi
  echo "== worker $WORKER: $job $state; $log"
  [ -f "$log" ] && tail -n "$n" "$log"
  return 0
}

stop() {
  local job=$1 pid
  pid=$(cat "$LOGS/$job/worker-$WORKER.pid" 2>/dev/null)
  if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then
    echo "worker $WORKER: sent SIGTERM to $job (pid $pid)"
  else
    echo "worker $WORKER: $job is not running"
  fi
}

mount_bucket() {
  local bucket=${1#gs://} dir=$2
  if ! command -v gcsfuse >/dev/null; then  # apt repository of Cloud Storage FUSE
    echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - >/dev/null
    sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse || die "could not install gcsfuse"
  fi
  if mountpoint -q "$dir"; then echo "worker $WORKER: $dir is already mounted"; return 0; fi
  sudo mkdir -p "$dir" && sudo chown "$(id -u):$(id -g)" "$dir" || die "cannot create $dir"
  gcsfuse --implicit-dirs "$bucket" "$dir" || die "gcsfuse $bucket $dir failed"
  echo "worker $WORKER: gs://$bucket mounted on $dir"
}

case ${1:-} in
  install) install ;;
  run) shift; [ $# -ge 1 ] || die "usage: remote.sh run JOB CMD [ARG...]"; run "$@" ;;
  _job) shift; _job "$@" ;;
  tail) shift; [ $# -ge 1 ] || die "usage: remote.sh tail JOB [N]"; tail_log "$@" ;;
  stop) shift; [ $# -eq 1 ] || die "usage: remote.sh stop JOB"; stop "$1" ;;
  mount) shift; [ $# -eq 2 ] || die "usage: remote.sh mount BUCKET DIR"; mount_bucket "$@" ;;
  *) die "usage: remote.sh install | run JOB CMD [ARG..] | tail JOB [N] | stop JOB | mount B DIR" ;;
esac
