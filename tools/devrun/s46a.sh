#!/bin/bash
# Forty-sixth session: every test executable on the detected tier (AMX on the Xeon), the kernels'
# executables on AVX-VNNI (NIBBLE_KERNEL=avx2) and on AVX-512 without AMX, one layer of every
# format against the packed f32 one (format_layers, 16 threads, batch 1024 and 1; added in the
# forty-eighth session), then one table round beside PyTorch 2.11. Output under $OUT when set.
source .devrun/setup.sh
B=$P/bin
T0=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - T0) )); }
echo "commit $(cat $P/COMMIT) $(date -u +%T) load $(cat /proc/loadavg) cpus $(nproc)"
grep -o -w -E 'amx_int8|amx_tile|amx_bf16|avx512_vnni|avx_vnni|avx512bw' /proc/cpuinfo | sort | uniq -c
echo "== tests $(date -u +%T)"
timeout $(left) bash -c 'source .devrun/setup.sh; run_tests default'
K='^(act8|act8_gemm|kernels|nibble_quant|low_rank|tiers|gemm|packed|nibble_tensor|row_ops|activations_int8_d1024)-'
timeout $(left) bash -c "source .devrun/setup.sh; NIBBLE_AMX=0 run_tests amx0 '$K'"
timeout $(left) bash -c "source .devrun/setup.sh; NIBBLE_KERNEL=avx2 run_tests avx2-vnni '$K'"
echo "== format_layers $(date -u +%T), $(left) s left"
[ $(left) -gt 260 ] && for b in 1024 1; do RAYON_NUM_THREADS=16 timeout 40 $B/format_layers $b 15 18; done
echo "== table $(date -u +%T), $(left) s left"
[ $(left) -gt 200 ] && timeout $(left) bash .devrun/run_table.sh
echo "== end $(date -u +%T)"
