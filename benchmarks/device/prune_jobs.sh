# bash benchmarks/device/prune_jobs.sh GGUF TOKENIZER "NAME,METHODS,TARGETS ..." (TOKENIZER a folder, or - for the
# GGUF's own; methods and targets split by /, e.g. wanda/alps and 0.5/2:4): warm the GGUF cache once, then one
# run_pruning.py process per job in parallel, each writing /tmp/m/NAME.json and /tmp/m/NAME.log.
# Meant as start.sh's command, e.g. start.sh smol 'bash benchmarks/device/prune_jobs.sh /tmp/gguf/smol.gguf - "s1,alps,0.6"'
gguf=$1; tok=(); [ "$2" != - ] && tok=(--tokenizer "$2")
mkdir -p /tmp/m
python3 -c "import sys; from sparseswaps.models import load_model; load_model(sys.argv[1], tokenizer=sys.argv[2] if sys.argv[2] != '-' else None)" \
  "$gguf" "$2" > /tmp/m/warm.log 2>&1
echo "warm rc=$? $(date +%T)"
run() { python3 benchmarks/run_pruning.py --model "$gguf" "${tok[@]}" --methods "$2" --targets "$3" --out "/tmp/m/$1.json" \
          > "/tmp/m/$1.log" 2>&1; echo "$1 rc=$? $(date +%T)"; }
for job in $3; do
  IFS=, read -r name methods targets <<< "$job"
  echo "start $name ${methods//\//,} ${targets//\//,}"
  run "$name" "${methods//\//,}" "${targets//\//,}" &
done
wait
