#!/usr/bin/env bash
# Sets up the CPU peers users pick for StarCoder-family models, from a local GPTBigCode checkpoint and package
# registries only:  setup.sh CKPT_DIR WORK_DIR      (about 15 minutes on 2 cores the first time: the build)
#   WORK_DIR/venv                              CTranslate2 + transformers (its converter), torch CPU
#   WORK_DIR/ct2_float32, ct2_int8             CTranslate2 models
#   WORK_DIR/llama.cpp/build/bin/llama-{bench,batched-bench,quantize,server}
#   WORK_DIR/model-{f32,Q8_0,Q4_0}.gguf        GGUF models (architecture `starcoder`)
#   WORK_DIR/ckpt_tok                          the checkpoint with a tokenizer, when it had none
# llama.cpp comes from the llama-cpp-python sdist on PyPI, which vendors the whole tree (convert_hf_to_gguf.py
# included). Converters insist on a tokenizer: a random-weight checkpoint gets a byte-level BPE of its
# vocabulary size trained on the Python standard library (mktok.py), which llama.cpp is told to treat as GPT-2's.
set -euo pipefail
HERE=$(dirname "$(realpath "$0")")
CKPT=$(realpath "$1"); W=$(realpath -m "$2"); mkdir -p "$W"; cd "$W"
[ -x venv/bin/python ] || python3 -m venv venv
venv/bin/pip install -q torch==2.13.0 "transformers==4.57.6" ctranslate2 tokenizers
if [ ! -f "$CKPT/tokenizer.json" ] && [ ! -f "$CKPT/vocab.json" ]; then
  V=$(venv/bin/python -c "import json;print(json.load(open('$CKPT/config.json'))['vocab_size'])")
  rm -rf ckpt_tok && cp -r "$CKPT" ckpt_tok && CKPT=$W/ckpt_tok && venv/bin/python "$HERE/mktok.py" "$CKPT" "$V"
fi
for q in float32 int8; do
  [ -d ct2_$q ] || venv/bin/ct2-transformers-converter --model "$CKPT" --output_dir ct2_$q --quantization $q --force
done
if [ ! -x llama.cpp/build/bin/llama-server ] || [ ! -x llama.cpp/build/bin/llama-batched-bench ]; then
  if [ ! -d llama.cpp ]; then
    pip download -q --no-deps --no-binary :all: -d sdist llama-cpp-python==0.3.36
    tar xzf sdist/llama_cpp_python-0.3.36.tar.gz && mv llama_cpp_python-0.3.36/vendor/llama.cpp llama.cpp
    sed -i '0,/^        logger.debug(f"chkhsh: {chkhsh}")$/s//&\n        return "gpt-2"  # benchmark: synthetic tokenizer/' \
      llama.cpp/conversion/base.py
  fi
  cmake -S llama.cpp -B llama.cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build llama.cpp/build -j2 --target llama-bench llama-quantize llama-server llama-batched-bench >/dev/null
fi
[ -f model-f32.gguf ] || PYTHONPATH=llama.cpp/gguf-py venv/bin/python llama.cpp/convert_hf_to_gguf.py "$CKPT" \
  --outtype f32 --outfile model-f32.gguf
for q in Q8_0 Q4_0; do [ -f model-$q.gguf ] || llama.cpp/build/bin/llama-quantize model-f32.gguf model-$q.gguf $q >/dev/null; done
echo "ready in $W"
