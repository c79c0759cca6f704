#!/bin/bash
# The closing table (PyTorch 2.11 measure_ref.py, bignet bench f32 and int8): PyTorch 2.11 then nibble, 16 threads, peak around.
source .devrun/setup.sh
B=$P/bin
echo "commit $(cat $P/COMMIT) $(date -u +%T) load $(cat /proc/loadavg)"
peak 16
echo "== pytorch $(date -u +%T)"; (cd $P/ref && PYTHONUNBUFFERED=1 timeout 200 python3 measure_ref.py --threads 16 --quick 2>&1 | tail -30)
peak 16
echo "== nibble f32 $(date -u +%T)"; timeout 150 $B/${BIG:-bignet} bench bignet half_precision lora low_precision qlora --batch 1,1024 --runs 9 --threads 16 --train
echo "== nibble int8 $(date -u +%T)"; timeout 100 $B/${BIG:-bignet} bench low_precision qlora lower_precision nf4 nf4_dq int8 --batch 1,1024 --runs 9 --threads 16 --activations int8
peak 16
echo "== end $(date -u +%T)"
