#!/bin/bash
# A job longer than one device call (10 minutes at most), run detached on the lent GPU machine.
#
#   bash benchmarks/lease.sh start NAME COMMAND...   # from the checkout's root; returns at once
#   bash benchmarks/lease.sh poll NAME SECONDS       # waits up to SECONDS, then packs the job's results into $OUT
#
# start installs the wheels of .carry/ (omegaconf, kernel libraries) into /tmp/site and runs COMMAND in the
# checkout with PYTHONPATH=/tmp/site:$PWD and PYTHONUNBUFFERED=1, detached with setsid, so that it keeps running
# between calls while the machine stays warm. COMMAND writes its results under $JOB_OUT; its output goes to
# $JOB_OUT/console.log and its exit status to $JOB_OUT/rc when it ends.
#
# poll first checks that the job is on this machine. A machine can go back between two calls and the next call
# then gets a fresh one. poll then stops at once with exit status 3 instead of waiting for a job that is not
# there. Otherwise it waits until the job ends or SECONDS pass, packs $JOB_OUT into $OUT as NAME.tgz.part-*
# (15 MB parts; weights *.safetensors / *.pt and checkpoints/ folders are left out, and folders named samples/
# too when all would pass 60 MB), and prints FINISHED rc=N or RUNNING and the console's last lines. Join the
# parts with `cat NAME.tgz.part-* | tar xzf -`. LEASE_ROOT (default /tmp/lease) holds the jobs.
set -u
usage() { echo "usage: bash benchmarks/lease.sh start NAME COMMAND... | poll NAME SECONDS" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1 name=$2
shift 2
job=${LEASE_ROOT:-/tmp/lease}/$name
case $action in
start)
    [ $# -ge 1 ] || usage
    if [ -e "$job" ]; then echo "lease: job $name exists already in $job; poll it, or give another name" >&2; exit 2; fi
    mkdir -p "$job" /tmp/site
    if compgen -G ".carry/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/*.whl || exit 1
    fi
    printf '%q ' "$@" > "$job/command"
    JOB_OUT=$job PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 setsid nohup bash -c \
        '"$@" > "$JOB_OUT/console.log" 2>&1; echo $? > "$JOB_OUT/rc"' lease "$@" < /dev/null > /dev/null 2>&1 &
    echo "lease: started $name (pid $!) in $job"
    ;;
poll)
    [ $# -eq 1 ] || usage
    if [ ! -d "$job" ]; then
        echo "lease: no job $name on this machine: the machine that ran it has gone back; start it again" >&2
        exit 3
    fi
    end=$(( $(date +%s) + $1 ))
    while [ ! -e "$job/rc" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    pack() { tar czf "$1" -C "$job" --exclude='*.safetensors' --exclude='*.pt' --exclude='checkpoints' "${@:2}" .; }
    pack "/tmp/$name.tgz"
    if [ "$(wc -c < "/tmp/$name.tgz")" -gt 60000000 ]; then
        pack "/tmp/$name.tgz" --exclude='samples'
        echo "lease: the samples/ folders were left out (over 60 MB with them)"
    fi
    split -b 15M "/tmp/$name.tgz" "${OUT:?poll packs into \$OUT}/$name.tgz.part-" && rm "/tmp/$name.tgz"
    if [ -e "$job/rc" ]; then echo "FINISHED rc=$(cat "$job/rc")"; else echo RUNNING; fi
    tail -n 15 "$job/console.log"
    ;;
*) usage ;;
esac
