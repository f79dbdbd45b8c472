# One back-to-back call per piece (carry .carry/NAME.partK): bash benchmarks/device/piece.sh NAME.partK
# Copies the piece into /tmp/gguf, where assemble.sh joins the pieces once all have arrived.
set -e
cp ".carry/$1" "/tmp/gguf/$1.tmp" && mv "/tmp/gguf/$1.tmp" "/tmp/gguf/$1"
ls /tmp/gguf | tr '\n' ' '; echo
