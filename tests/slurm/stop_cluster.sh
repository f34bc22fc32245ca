#!/usr/bin/env bash
# Stop the single-node Slurm test cluster started by start_cluster.sh:
# cancel all jobs, then stop slurmd, slurmctld and munged. Bounded waits.
# Leaves config, state (/var/spool/slurm*) and logs in place.
set -u

if command -v scancel >/dev/null 2>&1 && pgrep -x slurmctld >/dev/null; then
    for u in $(timeout 10 squeue -h -o %u 2>/dev/null | sort -u); do
        timeout 10 scancel --quiet --user="$u" >/dev/null 2>&1 || true
    done
    # Give running jobs a moment to be killed by slurmd.
    for _ in $(seq 20); do
        [ -z "$(timeout 5 squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

stop() { # stop NAME; SIGTERM, then SIGKILL after ~10 s
    local pids
    pids=$(pgrep -x "$1" || true)
    [ -n "$pids" ] || return 0
    kill $pids 2>/dev/null
    for _ in $(seq 40); do kill -0 $pids 2>/dev/null || return 0; sleep 0.25; done
    kill -9 $pids 2>/dev/null || true
}

stop slurmd
stop slurmctld
stop munged
rm -f /run/slurmd.pid /run/slurmctld.pid
echo "slurm: cluster stopped"
