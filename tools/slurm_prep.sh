#!/usr/bin/env bash
# `ips prep` over a cluster's job array: each task converts every n-th input (`--shard i/n`), so the
# tasks split the inputs without talking to each other, and a rerun of a failed task redoes only its
# share (complete stores are skipped; a store whose options differ is refused, naming --overwrite).
#
#   sbatch --array=0-15 tools/slurm_prep.sh --out /data/stores --patch-size 256 --mpp 0.5 /data/slides/*.svs
#
# Every task must see the same input list (the shard is taken over the sorted, de-duplicated inputs).
# Options after the script name go to `ips prep` as they are. Outside SLURM, IPS_SHARD_INDEX and
# IPS_SHARD_COUNT stand in for SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT.
#SBATCH --job-name=ips-prep
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=ips-prep-%A_%a.log
set -euo pipefail
index="${SLURM_ARRAY_TASK_ID:-${IPS_SHARD_INDEX:-}}"
count="${SLURM_ARRAY_TASK_COUNT:-${IPS_SHARD_COUNT:-}}"
if [ -z "$index" ] || [ -z "$count" ]; then
  echo "slurm_prep.sh: run as a job array (sbatch --array=0-N) or set IPS_SHARD_INDEX and IPS_SHARD_COUNT" >&2
  exit 2
fi
workers="${SLURM_CPUS_PER_TASK:-1}"
exec "${IPS:-ips}" prep "$@" --workers "$workers" --shard "$index/$count"
