#!/usr/bin/env bash
# Runs one gptrl job on this host, detached from the connection that started it (launch/tpu_vm.py calls it on
# every TPU worker over `gcloud ... ssh --worker=all`):
#
#   worker.sh start  NAME ATTEMPT COMMAND...   start COMMAND in its own session; log NAME-ATTEMPT.log
#   worker.sh follow NAME [ATTEMPT] [LINES]    stream the log (ATTEMPT "latest": the newest) until the job ends,
#                                              then print "gptrl-exit-code=<code> host=<host>"
#   worker.sh stop   NAME                      SIGTERM to the job: gptrl saves a checkpoint and exits 75
#
# Files in $GPTRL_LOGS (default ~/gptrl-logs): NAME-ATTEMPT.log, NAME.pid (the job's process group), NAME.rc (its
# exit code, written when it ends; "none" while running or if the host went down first).
set -euo pipefail
logs="${GPTRL_LOGS:-$HOME/gptrl-logs}"
action="${1:?usage: worker.sh start|follow|stop NAME ...}"
name="${2:?usage: worker.sh $action NAME ...}"
mkdir -p "$logs"
case "$action" in
  start)
    attempt="${3:?usage: worker.sh start NAME ATTEMPT COMMAND...}"
    shift 3
    rm -f "$logs/$name.rc"
    # setsid: a session (and process group) of its own, so a dropped ssh connection does not hang it up and `stop`
    # can signal the whole group. nohup + closed stdin: nothing ties it to the terminal.
    setsid nohup bash "$0" _run "$name" "$attempt" "$@" > /dev/null 2>&1 < /dev/null &
    echo $! > "$logs/$name.pid"
    echo "started $name attempt $attempt on $(hostname): pid $(cat "$logs/$name.pid"), log $logs/$name-$attempt.log"
    ;;
  _run)
    attempt="$3"
    shift 3
    # A handler (not "ignore", which the job would inherit): this shell outlives a SIGTERM to the group, so the
    # job's exit code (75 after a preemption checkpoint) is still recorded.
    trap 'true' TERM
    set +e
    "$@" > "$logs/$name-$attempt.log" 2>&1
    echo $? > "$logs/$name.rc"
    ;;
  follow)
    attempt="${3:-latest}"
    lines="${4:-+1}"
    if [ "$attempt" = latest ]; then
      for _ in $(seq 1 50); do  # a job started a moment ago may not have opened its log yet
        compgen -G "$logs/$name-*.log" > /dev/null && break
        sleep 0.2
      done
      log="$(ls -t "$logs/$name"-*.log 2>/dev/null | head -n 1 || true)"
      log="${log:-$logs/$name-none.log}"
    else
      log="$logs/$name-$attempt.log"
    fi
    pid="$(cat "$logs/$name.pid")"
    # tail exits by itself once the job's process is gone (--pid), after printing what it wrote last.
    tail -n "$lines" -F --pid="$pid" "$log" 2>/dev/null | sed -u "s/^/[$(hostname)] /" || true
    echo "gptrl-exit-code=$(cat "$logs/$name.rc" 2>/dev/null || echo none) host=$(hostname)"
    ;;
  stop)
    kill -TERM -- "-$(cat "$logs/$name.pid")" 2>/dev/null || echo "$name: no running job on $(hostname)"
    ;;
  *)
    echo "worker.sh: unknown action $action (start, follow, stop)" >&2
    exit 2
    ;;
esac
