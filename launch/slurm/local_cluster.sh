#!/usr/bin/env bash
# A private single-node Slurm cluster on 127.0.0.1 for tests and trying the sbatch scripts.
#
#   launch/slurm/local_cluster.sh start DIR    # write DIR/slurm.conf, start munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch / squeue / scontrol talk to it
#   launch/slurm/local_cluster.sh status DIR
#   launch/slurm/local_cluster.sh stop DIR     # cancel its jobs, stop the daemons by their PID files
#
# Everything lives in DIR (config, munge key and socket, state, spool, logs, PID files), so it does
# not touch a system Slurm or munge. Needs Debian's `slurmctld slurmd slurm-client munge`
# (tools/apt-packages.sh) and root: slurmd starts job steps. Ports: SLURMCTLD_PORT and SLURMD_PORT,
# else two free ones. Recipe: no accounting, ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none, the node line from `slurmd -C`.
set -euo pipefail

usage() {
    echo "usage: $0 {start|stop|status} DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pid_alive() {  # pid_alive PIDFILE
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local pidfile=$1 name=$2 pid i
    if ! pid_alive "$pidfile"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "local_cluster: $name ($pid) ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    echo "local_cluster: stopped $name ($pid, after ${i}x0.1 s)"
}

write_config() {
    local host node ctld_port slurmd_port
    host=$(hostname -s)
    # `slurmd -C` prints the node's real CPUs/sockets/cores/memory; drop its UpTime line.
    node=$(slurmd -C | head -n 1)
    case $node in
        NodeName=*) ;;
        *) echo "local_cluster: unexpected 'slurmd -C' output: $node" >&2; exit 1 ;;
    esac
    ctld_port=${SLURMCTLD_PORT:-$(free_port)}
    slurmd_port=${SLURMD_PORT:-$(free_port)}
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
    cat >"$conf" <<EOF
# Written by launch/slurm/local_cluster.sh: a private single-node cluster on 127.0.0.1.
ClusterName=kdlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    : >"$dir/plugstack.conf"
}

start() {
    local bin
    for bin in munged mungekey slurmctld slurmd sinfo; do
        command -v "$bin" >/dev/null || {
            echo "local_cluster: $bin not found (run tools/apt-packages.sh)" >&2
            exit 127
        }
    done
    if pid_alive "$dir/slurmctld.pid" || pid_alive "$dir/slurmd.pid"; then
        echo "local_cluster: already running in $dir (stop it first)" >&2
        exit 1
    fi
    mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
    chmod 700 "$dir/munge"
    [ -s "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key"
    chmod 600 "$dir/munge/munge.key"
    write_config

    # --force: munged refuses to run as root or with a key outside /etc/munge otherwise.
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    slurmctld -f "$conf" -i
    slurmd -f "$conf"

    local i state=""
    for i in $(seq 300); do
        state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true)
        case $state in
            idle*|mix*|alloc*) break ;;
        esac
        sleep 0.1
    done
    case $state in
        idle*|mix*|alloc*) ;;
        *)
            echo "local_cluster: node not ready after 30 s (state '$state'); logs in $dir/log" >&2
            tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
            exit 1
            ;;
    esac
    echo "local_cluster: up after ${i}x0.1 s; node $(hostname -s) $state"
    echo "export SLURM_CONF=$conf"
}

stop() {
    local i
    if pid_alive "$dir/slurmctld.pid"; then
        # Cancel this cluster's jobs first: their slurmstepd processes outlive slurmd otherwise.
        scancel --user="$(id -un)" 2>/dev/null || true
        for i in $(seq 300); do
            [ -z "$(squeue -h -t running,completing -o '%A' 2>/dev/null || true)" ] && break
            sleep 0.1
        done
    fi
    stop_pid "$dir/slurmd.pid" slurmd
    stop_pid "$dir/slurmctld.pid" slurmctld
    stop_pid "$dir/munge/munged.pid" munged
}

status() {
    local name file
    for name in munged slurmctld slurmd; do
        file=$dir/$name.pid
        [ "$name" = munged ] && file=$dir/munge/munged.pid
        if pid_alive "$file"; then
            echo "$name: running ($(cat "$file"))"
        else
            echo "$name: stopped"
        fi
    done
    pid_alive "$dir/slurmctld.pid" && sinfo -N -l
    return 0
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
