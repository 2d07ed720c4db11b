#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the cluster tests (tests/test_slurm.py) and for trying
# `unidad-dist launch slurm` without a cluster. Needs root and Debian's packages:
#
#   bash tools/slurm_local.sh install   # apt-get install slurmctld slurmd slurm-client munge (~10 s)
#   bash tools/slurm_local.sh start     # munge key, munged, slurm.conf, slurmctld, slurmd; waits for "idle"
#   bash tools/slurm_local.sh stop      # scontrol shutdown, stop munged
#   bash tools/slurm_local.sh status    # sinfo
#
# One partition, "debug", holding this host with all its CPUs and its memory less 2 GiB; no accounting
# (sacct is disabled: submitit then logs "Bypassing sacct error", results still come back). Facts behind each
# key: the SLURM section of docs/clusters.md.
set -euo pipefail

host=$(hostname -s)
conf=/etc/slurm/slurm.conf

install() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    }
}

start() {
    if sinfo -h -o %T 2>/dev/null | grep -q idle; then
        echo "slurm: already up ($(sinfo -h -o '%P %D %T %C'))"
        return 0
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge /etc/slurm /run/slurm /var/spool/slurmctld \
             /var/spool/slurmd /var/log/slurm
    if [ ! -s /etc/munge/munge.key ]; then
        head -c 1024 /dev/urandom > /etc/munge/munge.key
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 400 /etc/munge/munge.key
    chmod 700 /etc/munge
    if ! pgrep -x munged >/dev/null; then
        runuser -u munge -- /usr/sbin/munged
    fi
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))
    cat > "$conf" <<EOF
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${host} NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
    chown -R slurm:slurm /var/spool/slurmctld /run/slurm /var/log/slurm
    pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
    pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
    for _ in $(seq 1 100); do
        if sinfo -h -o %T 2>/dev/null | grep -q idle; then
            echo "slurm: up ($(sinfo -h -o '%P %D %T %C'))"
            return 0
        fi
        sleep 0.2
    done
    echo "slurm: the node did not become idle; logs in /var/log/slurm" >&2
    sinfo >&2 || true
    return 1
}

stop() {
    scontrol shutdown >/dev/null 2>&1 || true
    if [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
}

case "${1:-start}" in
    install) install ;;
    start) install && start ;;
    stop) stop ;;
    status) sinfo ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
