#!/usr/bin/env bash
# Train on N nodes x 8 GPUs under Slurm: one `tune run` per node, meeting through torchrun's c10d rendezvous on
# the first node of the allocation (tests/test_multinode.py runs the same launch as 2 nodes x 1 process on one
# machine and checks it trains exactly like 1 node x 2 processes).
#
#   sbatch --nodes 4 scripts/slurm_multinode.sh recipes/rao_distributed.py configs/llama3_8b_rao.yaml \
#       loss.beta=0.1 loss.z0=50 output_dir=/shared/runs/llama3_8b_rao
#
# Needs a file system every node sees for output_dir (each process writes its own shards of the step
# checkpoints into output_dir/checkpoints) and for RAO_TUNE_CACHE (rank 0 tokenizes the data once and every
# process memory-maps the copy; a node that cannot see it tokenizes again). The job runs with
# resume_from_checkpoint=auto overwrite=True, so a requeued or resubmitted job continues from the newest complete
# step checkpoint, on any number of nodes whose processes divide the global batch (gradient accumulation absorbs
# the change), or starts afresh if it died before its first one; pass resume_from_checkpoint=False overwrite=False
# to refuse both.
#
# Preemption: Slurm sends SIGTERM 120 s before the time limit (--signal) or a preemption; torchrun forwards it to
# every worker (and SIGKILLs them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later), which finishes its optimizer step,
# writes a step checkpoint and stops, leaving output_dir/preempted.json. This script then requeues the job
# (--requeue), which resumes from that checkpoint.
#
#SBATCH --job-name=rao-tune
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: sbatch --nodes N $0 RECIPE CONFIG [key=value ...]" >&2
    exit 2
fi
recipe=$1 config=$2
shift 2

gpus_per_node=${GPUS_PER_NODE:-8}
rendezvous_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
rendezvous_port=${RENDEZVOUS_PORT:-29500}
export RAO_TUNE_CACHE=${RAO_TUNE_CACHE:-$HOME/.cache/rao_tune}  # on a shared file system
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Fail fast (instead of hanging until the collective timeout) if one node dies mid-collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# torchrun SIGKILLs its workers this many seconds after forwarding SIGTERM (its default, 30 s, is short for a
# step plus an 8B step checkpoint); keep it below the --signal warning above.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
# The run folder, from the overrides or the config (for the preemption note; a value with ${...} or quotes is not
# resolved here: pass output_dir=... on the command line).
output_dir=$(printf '%s\n' "$@" | sed -n 's/^output_dir=//p' | tail -n 1)
output_dir=${output_dir:-$(sed -n 's/^output_dir: *\([^ #]*\).*/\1/p' "$config" 2>/dev/null | head -n 1 || true)}
# A note left by an earlier stop would requeue this job again if it failed before the recipe removes it.
[[ -n "$output_dir" ]] && rm -f "$output_dir/preempted.json"

echo "$SLURM_JOB_NUM_NODES nodes x $gpus_per_node GPUs, rendezvous at $rendezvous_host:$rendezvous_port"
status=0
srun --kill-on-bad-exit=1 tune run \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$gpus_per_node" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$rendezvous_host:$rendezvous_port" \
    --rdzv_id "$SLURM_JOB_ID" \
    "$recipe" --config "$config" resume_from_checkpoint=auto overwrite=True "$@" || status=$?

if [[ -n "$output_dir" && -f "$output_dir/preempted.json" ]]; then
    echo "preempted, checkpoint saved: $(cat "$output_dir/preempted.json"); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
