#!/bin/bash
# The 16-core Xeon run of the twenty-ninth session (never lent): small-batch A/B of two bignet builds, tests on every tier, forward_profile.
source .devrun/setup.sh
B=$P/bin
# A/B baselines (bignet_fused etc.) are binaries copied into .devrun/pkg/bin by hand.
T0=$(date +%s)
left() { echo $(( 140 - ($(date +%s) - T0) )); }
echo "commit $(cat $P/COMMIT) $(date -u +%T) load $(cat /proc/loadavg) cpus $(nproc)"
lscpu | grep -E "Model name|L2|L3"
peak 16
export RAYON_NUM_THREADS=16
echo "== A/B small batches: 23a40b4 vs fused low-rank pass (bignet_fused), 3 rounds $(date -u +%T)"
for r in 1; do for b in $B/bignet $B/bignet_fused; do for a in int8 f32; do echo -n "$(basename $b) $a "; timeout 40 $b bench qlora lora low_precision --batch 2,4,8 --runs 40 --threads 16 --activations $a | grep -o "^[a-z_]* *batch *[0-9]*  forward *[0-9.]* ms  (min [0-9.]*, max [0-9.]*)" | tr -s ' ' | sed 's/ forward//; s/ batch /b/' | tr '\n' ';'; echo; done; done; done
peak 16
echo "== tests $(date -u +%T)"
unset RAYON_NUM_THREADS
timeout $(left) bash -c 'source .devrun/setup.sh; run_tests default'
timeout $(left) bash -c 'source .devrun/setup.sh; NIBBLE_AMX=0 run_tests amx0 "^(act8|act8_gemm|kernels|nibble_quant|low_rank|tiers|activations_int8_d1024)-"'
timeout $(left) bash -c 'source .devrun/setup.sh; NIBBLE_KERNEL=avx2 NIBBLE_AVXVNNI=0 run_tests avx2-novnni "^(act8|act8_gemm|kernels|nibble_quant|low_rank|tiers|gemm|packed|nibble_tensor|activations_int8_d1024)-"'
export RAYON_NUM_THREADS=16
echo "== forward_profile q4 int8 $(date -u +%T)"; timeout $(left) $B/forward_profile 1024 5 q4 int8
echo "== forward_profile q4 f32 $(date -u +%T)"; timeout $(left) $B/forward_profile 1024 5 q4 f32
echo "== end $(date -u +%T)"
