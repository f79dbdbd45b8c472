# bash benchmarks/device/assemble.sh NAME SHA256: join /tmp/gguf/NAME.part0, part1, ... (and a last piece carried
# in this call as .carry/NAME.partK) into /tmp/gguf/NAME.gguf, and refuse it unless its SHA-256 is SHA256.
set -e
for p in .carry/"$1".part*; do [ -f "$p" ] && cp "$p" /tmp/gguf/; done
ls /tmp/gguf/"$1".part* | sort -V | xargs cat > "/tmp/gguf/$1.gguf"
got=$(sha256sum "/tmp/gguf/$1.gguf" | cut -d' ' -f1)
if [ "$got" != "$2" ]; then
  echo "/tmp/gguf/$1.gguf has SHA-256 $got, not $2: a piece is missing or damaged; send its piece.sh call again" >&2
  rm -f "/tmp/gguf/$1.gguf"; exit 1
fi
echo "/tmp/gguf/$1.gguf ok"
