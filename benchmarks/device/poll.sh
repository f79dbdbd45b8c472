# bash benchmarks/device/poll.sh MAXS: wait until every job start.sh began has its .done file (at most MAXS s),
# packing /tmp/r and /tmp/m into $OUT/r.tgz every minute, so a call cut short still returns what finished;
# then report each job's status and the last line of its log.
[ -d /tmp/r ] || { echo "fresh machine: nothing started, nothing to poll"; exit 3; }
shopt -s nullglob
pack() { (cd /tmp && tar czf "$OUT/r.tgz" r m 2>/dev/null); }
pending() { for s in /tmp/r/*.started; do [ -f "${s%.started}.done" ] || echo "$s"; done; }
end=$((SECONDS + ${1:-500}))
while [ $SECONDS -lt $end ] && [ -n "$(pending)" ]; do
  sleep 10
  [ $((SECONDS % 60)) -lt 10 ] && pack
done
pack; date +%T
for s in /tmp/r/*.started; do
  n=$(basename "${s%.started}")
  status=$(cat "/tmp/r/$n.done" 2>/dev/null || echo running)
  echo "$n: $status | $(tr '\r' '\n' < "/tmp/r/$n.log" | grep -v Warn | tail -n1 | cut -c1-150)"
done
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
