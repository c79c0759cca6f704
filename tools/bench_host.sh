#!/usr/bin/env bash
# One run of nibble against PyTorch, ggml and candle on this host, with the FMA / VNNI peak and
# memory bandwidth measured between the steps (`../shared/tools/peak_flops.c`), as the README's
# tables of the nineteenth session were taken. Run from the repository root after
#   cargo build --release --workspace --bins --examples
# and `pip install torch safetensors scikit-learn`.
#   tools/bench_host.sh [THREADS=2] > run.txt        (about 4 minutes on 2 cores)
set -u
T=${1:-2}
B=./target/release/bignet
E=./target/release/examples
SHARED=../shared
P=$SHARED/tools/peers
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
gcc -O3 -march=native -pthread "$SHARED/tools/peak_flops.c" -o "$W/peak" -lm || exit 1
gcc -O3 -march=native -pthread tools/weight_stream.c -o "$W/weight_stream" || exit 1
peak() { echo "### peak $(date -u +%T) load $(cat /proc/loadavg)"; "$W/peak" "$T" 2>&1 | tail -1; }
peak
echo "### PyTorch"; (cd "$SHARED/ref" && python3 measure_ref.py --threads "$T")
peak
for act in f32 int8; do
  echo "### bignet bench, activations $act, $(date -u +%T)"
  if [ "$act" = f32 ]; then
    V="bignet half_precision lora low_precision qlora lower_precision nf4 nf4_dq int8"
  else
    V="low_precision qlora lower_precision nf4 nf4_dq int8"
  fi
  # shellcheck disable=SC2086
  $B bench $V --threads "$T" --batch 1,1024 --runs 21 --activations "$act"
done
echo "### training step"
$B bench lora qlora --threads "$T" --batch 1 --runs 5 --train
$B bench qlora --threads "$T" --batch 1 --runs 5 --train --activations int8
peak
echo "### weight stream (BigNet's f32 weights at batch 1)"; "$W/weight_stream" "$T" 41 packed,chain | tail -2
echo "### weight stream (the int8 format's codes at batch 1)"; "$W/weight_stream" "$T" 41 int8,chain | tail -2
echo "### one layer"; RAYON_NUM_THREADS=$T $E/gemm_probe 1,1024 f32,f32p,q4 11
RAYON_NUM_THREADS=$T $E/act8_bench 1024 1 1024
echo "### ggml"
$P/bench_mm 0.5 5 "f32/$T/1,f32/$T/1024,q4_0/$T/1,q4_0/$T/1024,q4_0_repack/$T/1,q4_0_repack/$T/1024,q4_0_amx/$T/1" "$T"
echo "### candle"; RAYON_NUM_THREADS=$T $P/candle_bench all
peak
