#!/bin/bash
# Run from the checkout root: bash tools/devrun/mkpkg.sh; then on the device (run, carry [".devrun"]): bash .devrun/run_table.sh
# .devrun/ must be ignored (.git/info/exclude) and stay under 64 MiB with what it carries.
# Builds the device package: release test executables, bignet, profiling examples, peers, refs.
set -e
cd "$(dirname "$0")/../.."
rm -rf .devrun/pkg && mkdir -p .devrun/pkg/tests .devrun/pkg/bin .devrun/pkg/ref .devrun/pkg/peers
cargo test --release --workspace --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json,sys
for l in sys.stdin:
    try: j=json.loads(l)
    except Exception: continue
    if j.get("reason")=="compiler-artifact" and j.get("executable") and j.get("profile",{}).get("test"):
        print(j["executable"], j["manifest_path"].rsplit("/",1)[0])' > .devrun/pkg/tests.txt
while read -r e d; do cp "$e" .devrun/pkg/tests/; done < .devrun/pkg/tests.txt
cp target/release/bignet target/release/nibble .devrun/pkg/bin/
cp tools/devrun/*.sh .devrun/
for e in format_layers forward_profile gemm_probe lora_products team_anatomy train_lora; do cp target/release/examples/$e .devrun/pkg/bin/; done
cp ../shared/ref/*.py .devrun/pkg/ref/
cp ../shared/tools/peak_flops.c .devrun/pkg/
cp ../shared/tools/peers/bench_mm ../shared/tools/peers/bench_mm_noamx ../shared/tools/peers/candle_bench ../shared/tools/peers/run.sh .devrun/pkg/peers/
strip .devrun/pkg/tests/* .devrun/pkg/bin/* 2>/dev/null || true
(cd .devrun/pkg && tar cJf tests.tar.xz tests && rm -rf tests)
git rev-parse --short HEAD > .devrun/pkg/COMMIT
du -sh .devrun
