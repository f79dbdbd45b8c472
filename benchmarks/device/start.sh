# bash benchmarks/device/start.sh NAME 'COMMAND': run COMMAND in the background, in a snapshot of this checkout
# (/tmp/tree_NAME: a later call's checkout cannot change it mid-run), with its output in /tmp/r/NAME.log and its
# exit status in /tmp/r/NAME.done. It outlives the call (setsid) while the machine stays held: poll.sh waits for it.
set -e
tree=/tmp/tree_$1
rm -rf "$tree" && mkdir -p "$tree" && tar -C "$PWD" --exclude=./.carry --exclude=./.whl -cf - . | tar -C "$tree" -xf -
mkdir -p /tmp/r /tmp/m && rm -f "/tmp/r/$1.done" && touch "/tmp/r/$1.started"
cd "$tree"
export PYTHONPATH=/tmp/site:$tree HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
printf '%s\n' "$2" > "/tmp/r/$1.cmd"
setsid nohup bash -c 'echo "start $(date +%T)"; bash "$1"; echo "rc=$? $(date +%T)" > "$2"' _ "/tmp/r/$1.cmd" "/tmp/r/$1.done" \
  > "/tmp/r/$1.log" 2>&1 < /dev/null &
echo "started $1 in $tree"
