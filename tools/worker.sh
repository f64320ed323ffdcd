#!/usr/bin/env bash
# A background job queue for long runs (sweeps, benchmark grids, convergence runs) on a shared
# machine: each worker pops the first line of logs/queue and runs it niced, one thread, until the
# queue is empty or logs/stop-workers exists. Bench cells and train runs checkpoint, so a job cut
# short resumes when it runs again: a worker killed with its job (the machine's session ended) left
# the job in logs/NAME.running, and the next worker of that name runs it first.
#
#   echo '.venv/bin/zotune bench --grid configs/bench/sweep/zoadam-lora-fa.yaml --out runs/sweep/zoadam-lora-fa' >> logs/queue
#   (setsid nohup tools/worker.sh A > /dev/null 2>&1 &)      # output: logs/A.out, log: logs/worker.log
#   flock logs/queue.lock sed -i '1i COMMAND' logs/queue      # put a job at the front (of a queue not empty)
set -u
cd "$(dirname "$0")/.."
name=${1:?usage: tools/worker.sh NAME}
mkdir -p logs
touch logs/queue
running="logs/$name.running"
while [ ! -e logs/stop-workers ]; do
  if [ -s "$running" ]; then
    job=$(cat "$running")
    echo "$(date -u +%FT%TZ) $name again (its last worker was killed with it): $job" >> logs/worker.log
  else
    job=$(flock logs/queue.lock bash -c 'head -n 1 logs/queue; sed -i 1d logs/queue')
    [ -z "$job" ] && break
    echo "$job" > "$running"
    echo "$(date -u +%FT%TZ) $name start: $job" >> logs/worker.log
  fi
  OMP_NUM_THREADS=1 nice -n 10 bash -c "$job" >> "logs/$name.out" 2>&1
  rc=$?  # before the log line's $(date), which would set $? to its own
  rm -f "$running"
  echo "$(date -u +%FT%TZ) $name done rc=$rc: $job" >> logs/worker.log
done
