#!/usr/bin/env bash
# Run a llave-ds training launcher and exit with what the *trainer* decided: 0 completed,
# 3 preempted (checkpointed: requeue / relaunch with --resume auto), else the failure code.
#
#   launch/run_with_status.sh RUN_DIR -- torchrun --nproc_per_node 8 -m llave_ds.train --config C run_dir=RUN_DIR ...
#   launch/run_with_status.sh RUN_DIR -- deepspeed --num_gpus 8 --no_local_rank --module llave_ds.train ...
#
# Why: torchrun exits 1 when its ranks exit 3, and a launcher killed by a signal reports
# nothing about its ranks. The trainer's rank 0 writes RUN_DIR/exit_status.json
# ({"status": "completed" | "preempted" | "failed", "exit_code": N, ...}); this script reads it.
#
# Signals: SIGTERM, SIGUSR1 or SIGINT sent to this script are passed to the launcher as
# SIGTERM (torchrun and the deepspeed launcher forward SIGTERM to the ranks, which finish the
# step, checkpoint and exit 3). If the launcher itself dies at once (SIGUSR1 sent to it
# directly kills it), the ranks notice at the next step boundary, checkpoint and stop; this
# script then waits for their exit_status.json (LLAVE_DS_STATUS_WAIT_S, default 600 s).
set -u
if [ $# -lt 3 ] || [ "$2" != "--" ]; then
    echo "usage: $0 RUN_DIR -- LAUNCHER [ARGS...]" >&2
    exit 2
fi
RUN_DIR=$1
shift 2
STATUS="$RUN_DIR/exit_status.json"
WAIT_S=${LLAVE_DS_STATUS_WAIT_S:-600}
mkdir -p "$RUN_DIR"
rm -f "$STATUS"  # an earlier attempt's verdict must not be read as this one's

"$@" &
CHILD=$!
forward() {
    echo "run_with_status: $1 received, passing SIGTERM to the launcher (pid $CHILD)" >&2
    kill -TERM "$CHILD" 2>/dev/null
}
trap 'forward SIGTERM' TERM
trap 'forward SIGUSR1' USR1
trap 'forward SIGINT' INT

# `wait` returns early when a trapped signal arrives: wait again until the launcher is gone.
while :; do
    wait "$CHILD"
    CODE=$?
    kill -0 "$CHILD" 2>/dev/null || break
done

status_field() {  # the "status" value of the status file, or nothing
    sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p' "$STATUS" 2>/dev/null | head -n 1
}

# A launcher killed by a signal (exit code > 128) may leave its ranks running to their next
# step boundary: give them the time to checkpoint and write their verdict.
if [ ! -s "$STATUS" ] && [ "$CODE" -gt 128 ]; then
    echo "run_with_status: the launcher ended by signal $((CODE - 128)); waiting up to ${WAIT_S}s for the ranks" >&2
    for _ in $(seq "$WAIT_S"); do
        [ -s "$STATUS" ] && break
        sleep 1
    done
fi

case "$(status_field)" in
    completed) echo "run_with_status: training completed" >&2; exit 0 ;;
    preempted) echo "run_with_status: preempted, checkpointed: relaunch with --resume auto to continue" >&2; exit 3 ;;
    failed)
        code=$(sed -n 's/.*"exit_code": *\([0-9]*\).*/\1/p' "$STATUS" | head -n 1)
        # The trainer's own one-line reason, last: the launcher's tracebacks came before it.
        reason=$("${LLAVE_DS_PYTHON:-python3}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["message"])' \
                 "$STATUS" 2>/dev/null | head -n 1)
        echo "run_with_status: training failed (exit ${code:-1}): ${reason:-see the last lines of the ranks}" >&2
        exit "${code:-1}" ;;
    *)
        echo "run_with_status: no $STATUS: the ranks did not finish (killed?); launcher exit code $CODE" >&2
        [ "$CODE" -eq 0 ] && exit 1
        exit "$CODE" ;;
esac
