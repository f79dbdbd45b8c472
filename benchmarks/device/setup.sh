# Device call 1, from the checkout (carry .whl, plus .carry/tok and .carry/gemma_tok where the runs need them):
# install the wheels into /tmp/site, unpack the tokenizers, make the result folders. Safe to run again.
mkdir -p /tmp/site /tmp/gguf /tmp/m /tmp/r
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -1
fi
if [ -d .carry/tok ]; then mkdir -p /tmp/tok && cp -r .carry/tok/* /tmp/tok/; fi
if [ -f .carry/gemma_tok/tokenizer.json.gz ]; then
  mkdir -p /tmp/gemma_tok && cp .carry/gemma_tok/tokenizer_config.json /tmp/gemma_tok/ \
    && gunzip -c .carry/gemma_tok/tokenizer.json.gz > /tmp/gemma_tok/tokenizer.json
fi
git log --oneline -1 2>/dev/null | cut -c1-72
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
date +%T
