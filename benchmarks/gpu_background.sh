#!/usr/bin/env bash
# Long device work that outlives one device call (each call may run 10 minutes; the machine stays
# warm between back-to-back calls, and a process in its own session keeps running across them).
#   bash benchmarks/gpu_background.sh start NAME CMD...   # CMD runs under setsid; log in /root/bg/NAME.log
#   bash benchmarks/gpu_background.sh wait NAME SECONDS   # until NAME ends or SECONDS pass; prints its log's tail
# NAME.rc appears when CMD ends, holding its exit status.
set -uo pipefail
verb=${1:?start or wait}
name=${2:?name}
shift 2
mkdir -p /root/bg
case "$verb" in
  start)
    rm -f "/root/bg/$name.rc"
    # Every stream of the detached shell is redirected too: a held stdout would keep a caller's pipe
    # (`gpu_agree.sh start ... | tail`) open until CMD ends, so the call would block instead of returning.
    setsid bash -c '"$@" > "/root/bg/$0.log" 2>&1; echo $? > "/root/bg/$0.rc"' "$name" "$@" < /dev/null > /dev/null 2>&1 &
    echo "started $name (pid $!)"
    ;;
  wait)
    deadline=$(( $(date +%s) + ${1:?seconds} ))
    while [ ! -f "/root/bg/$name.rc" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
    if [ -f "/root/bg/$name.rc" ]; then echo "$name ended: exit $(cat "/root/bg/$name.rc")"; else echo "$name still running"; fi
    ;;
  *) echo "unknown verb $verb (allowed: start, wait)"; exit 2 ;;
esac
