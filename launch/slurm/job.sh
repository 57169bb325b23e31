# shellcheck shell=bash
# The body shared by launch/slurm/*.sbatch (sourced, not run): one launcher per node through srun,
# rendezvous on the job's first node, SIGUSR1 forwarded to the training processes, and
# `scontrol requeue` when they exit with 75 (they checkpointed after the signal).
#
# Environment it reads (all optional):
#   KD_ROOT           the repository (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   PYTHON            interpreter (default: $KD_ROOT/.venv/bin/python if present, else python3)
#   PROCS_PER_NODE    processes per node (default: GPUs on the node; on a node without GPUs the
#                     job's --ntasks-per-node, else 1)
#   ACCELERATE_CONFIG accelerate config file (default: launch/accelerate/multi_node.yaml)
#   MASTER_PORT       rendezvous port on the first node (default: 29500 + job id mod 20000)

KD_ROOT=${KD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
KD_EXIT_REQUEUE=75  # pipeline.train.signals.EXIT_REQUEUE

kd_log() {
    echo "[kd-slurm $(date +%H:%M:%S)] $*"
}

kd_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif [ -x "$KD_ROOT/.venv/bin/python" ]; then
        echo "$KD_ROOT/.venv/bin/python"
    else
        echo python3
    fi
}

kd_gpus_per_node() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 0
    fi
}

kd_signal_pending=""
kd_srun_pid=""

kd_forward() {  # trap handler: kd_forward SIGNAL
    kd_log "got SIG$1; forwarding it to the training processes"
    if [ -n "$kd_srun_pid" ]; then
        # srun passes the signal to every process of its step, on every node.
        kill -s "$1" "$kd_srun_pid" 2>/dev/null || true
    else
        kd_signal_pending=$1
    fi
}

# kd_run_job SCRIPT [ARGS...]: run SCRIPT on every node of the allocation; requeue on exit 75.
kd_run_job() {
    trap 'kd_forward USR1' USR1  # first: a SIGUSR1 during set-up is kept for the launchers
    local script=$1
    shift
    cd "$KD_ROOT" || return 1
    local py nodes master gpus procs device total rc
    py=$(kd_python)
    nodes=${SLURM_JOB_NUM_NODES:-1}
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR=$master
    export MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 20000))}
    gpus=$(kd_gpus_per_node)
    local -a launch=(--config_file "${ACCELERATE_CONFIG:-launch/accelerate/multi_node.yaml}")
    if [ "$gpus" -gt 0 ]; then
        device="GPU"
        procs=${PROCS_PER_NODE:-$gpus}
    else
        # CPU: gloo. ACCELERATE_USE_CPU=true with --multi_gpu starts the processes on the CPU;
        # `--cpu` would start only one (launch/README.md).
        device="CPU"
        procs=${PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
        export ACCELERATE_USE_CPU=true
    fi
    total=$((nodes * procs))
    launch+=(--num_machines "$nodes" --num_processes "$total" --dynamo_backend no
             --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
    if [ "$total" -gt 1 ]; then
        launch+=(--multi_gpu)
    elif [ "$device" = CPU ]; then
        launch+=(--cpu)  # one process: accelerate's simple launcher, told to stay on the CPU
    fi
    kd_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $procs" \
        "$device process(es), rendezvous $MASTER_ADDR:$MASTER_PORT; $script $*"

    # One launcher per node; each evaluates its own SLURM_NODEID as the machine rank.
    # shellcheck disable=SC2016  # $1, $@ and SLURM_NODEID expand in the task's shell on each node
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 \
        bash -c 'py=$1; shift; exec "$py" launch/slurm/node_launch.py --machine_rank "$SLURM_NODEID" "$@"' \
        kd-node "$py" "${launch[@]}" "$script" "$@" &
    kd_srun_pid=$!
    if [ -n "$kd_signal_pending" ]; then
        kd_forward "$kd_signal_pending"
    fi
    # `wait` returns early (status > 128) when a trapped signal arrives: wait again until srun ends.
    while true; do
        rc=0
        wait "$kd_srun_pid" || rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$kd_srun_pid" 2>/dev/null; then
            continue
        fi
        break
    done
    trap - USR1

    if [ "$rc" -eq "$KD_EXIT_REQUEUE" ]; then
        kd_log "training checkpointed after a signal (exit $rc); requeueing job $SLURM_JOB_ID"
        if scontrol requeue "$SLURM_JOB_ID"; then
            return 0
        fi
        kd_log "scontrol requeue failed; resubmit the same command to resume"
    else
        kd_log "training exited with status $rc"
    fi
    return "$rc"
}
