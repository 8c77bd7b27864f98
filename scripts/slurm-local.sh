#!/usr/bin/env bash
# A single-node Slurm on this machine, for hpcai's real-Slurm tests and for trying `hpcai submit` locally.
#
#   sudo scripts/slurm-local.sh start    # install (apt-get, only if missing), write slurm.conf, start
#                                        # munged, slurmctld, slurmd; wait until sinfo shows the node idle
#   sudo scripts/slurm-local.sh status   # daemons and sinfo
#   sudo scripts/slurm-local.sh stop     # stop slurmd, slurmctld and munged started here
#   scripts/slurm-local.sh conf          # print the slurm.conf that start would write (no root needed)
#   scripts/slurm-local.sh cpus          # the CPU count it configures for this node
#
# Debian 12 packages (Slurm 22.05), no systemd: every daemon is started by hand, as root (munged as `munge`).
# All state (spool, pid files, logs, slurm.conf) lives under $HPCAI_SLURM_DIR (default /var/tmp/hpcai-slurm);
# /etc/slurm/slurm.conf is a copy so that sbatch/squeue find it without SLURM_CONF. Running `start` twice
# is harmless: what runs is left alone. The keys are the ones checked in the project notes (slurm-local.md).
set -euo pipefail

DIR="${HPCAI_SLURM_DIR:-/var/tmp/hpcai-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by hpcai scripts/slurm-local.sh"
WAIT_S="${HPCAI_SLURM_WAIT_S:-60}"

say() { echo "slurm-local: $*"; }
die() { echo "slurm-local: error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"; }

install_if_missing() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 900 apt-get install -y -qq "${missing[@]}" >/dev/null
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    say "starting munged"
    su -s /bin/sh munge -c /usr/sbin/munged
    for _ in $(seq 50); do
        timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

# The CPUs this process may run on (affinity, cgroup cpuset), whatever the caller's OpenMP settings: coreutils
# nproc also obeys OMP_NUM_THREADS and OMP_THREAD_LIMIT, and with OMP_NUM_THREADS=1 exported (login nodes do)
# the node got CPUs=1 and every 2-rank job pended forever. Not `nproc --all`: in a container limited to some
# CPUs it counts the host's, and slurmd drains a node that has fewer CPUs than slurm.conf claims.
count_cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

conf_text() {
    local host cpus mem_mib
    host="$(hostname -s)"
    cpus="$(count_cpus)"
    # RealMemory a bit under MemTotal: slurmd drains a node that reports less than slurm.conf claims.
    mem_mib="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)"
    cat <<EOF
$MARK
ClusterName=hpcai-local
SlurmctldHost=$host
AuthType=auth/munge
# Requeue needs short credential lifetimes at slurmctld start (scontrol reconfigure does not apply it).
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MinJobAge=600
KillWait=5
NodeName=$host CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

write_conf() {
    mkdir -p "$DIR/spool/ctld" "$DIR/spool/d" "$DIR/log" "$DIR/run" /etc/slurm
    conf_text >"$DIR/slurm.conf"
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away first"
    fi
    cp "$DIR/slurm.conf" "$CONF"
}

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) state=""
    while [ $SECONDS -lt $deadline ]; do
        state="$(timeout 10 sinfo -h -o %T 2>/dev/null | head -1 || true)"
        case "$state" in
            idle | mixed | allocated) say "node $(hostname -s) is $state"; return 0 ;;
            drain* | down*) timeout 10 scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node not idle after ${WAIT_S}s (state '${state}'); see $DIR/log/slurmctld.log and slurmd.log"
}

cmd_start() {
    need_root
    install_if_missing
    start_munge
    if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid"; then
        say "already running"
        # E.g. CPUs=1 written by an older version of this script under OMP_NUM_THREADS=1.
        conf_text | cmp -s - "$DIR/slurm.conf" ||
            say "warning: the daemons run with an older $DIR/slurm.conf than \`$0 conf\` prints; stop, then start"
    else
        write_conf
        alive "$DIR/run/slurmctld.pid" || { say "starting slurmctld"; slurmctld; }
        alive "$DIR/run/slurmd.pid" || { say "starting slurmd"; slurmd; }
    fi
    wait_idle
}

stop_pidfile() {
    local name="$1" file="$2" pid
    alive "$file" || return 0
    pid="$(cat "$file")"
    say "stopping $name ($pid)"
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

cmd_stop() {
    need_root
    stop_pidfile slurmd "$DIR/run/slurmd.pid"
    stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
    stop_pidfile munged /run/munge/munged.pid
}

cmd_status() {
    local rc=0
    for d in slurmctld slurmd; do
        if alive "$DIR/run/$d.pid"; then say "$d running (pid $(cat "$DIR/run/$d.pid"))"; else say "$d not running"; rc=1; fi
    done
    alive /run/munge/munged.pid && say "munged running" || { say "munged not running"; rc=1; }
    [ $rc -eq 0 ] && timeout 10 sinfo || true
    return $rc
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    conf) conf_text ;;
    cpus) count_cpus ;;
    *) echo "usage: $0 start|stop|status|conf|cpus" >&2; exit 2 ;;
esac
