# Sourced on the device: unpack the package, link the checkout where the test binaries expect it.
R=$(pwd)
P=$R/.devrun/pkg
[ -e /work/main ] || { mkdir -p /work && ln -s "$R" /work/main; }
[ -d $P/tests ] || (cd $P && tar xJf tests.tar.xz)
# The CLI tests run the programs where cargo built them (CARGO_BIN_EXE_*: target/release).
mkdir -p "$R/target/release"
for b in bignet nibble; do [ -x "$R/target/release/$b" ] || cp "$P/bin/$b" "$R/target/release/$b"; done
[ -x /tmp/peak ] || gcc -O3 -march=native -pthread $P/peak_flops.c -o /tmp/peak
peak() { echo "peak $(date -u +%T) $(/tmp/peak ${1:-16})"; }
# run_tests LABEL [filter-regex-of-exe-names]: every test binary in its crate's folder.
run_tests() {
  local label=$1 filt=${2:-.} pass=0 fail=0 out
  while read -r e d; do
    local b; b=$(basename "$e")
    echo "$b" | grep -qE "$filt" || continue
    out=$(cd "$d" && timeout 300 "$P/tests/$b" --test-threads 16 2>&1)
    local rc=$?
    local p; p=$(echo "$out" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END{print s+0}')
    pass=$((pass+p))
    if [ $rc -ne 0 ]; then fail=$((fail+1)); echo "FAIL $label $b"; echo "$out" | grep -E 'FAILED|panicked|failed' | head -20; fi
    echo "$out" | grep -iE 'skip|lack' | sort -u | head -3 | sed "s/^/  [$b] /"
  done < $P/tests.txt
  echo "TESTS $label: $pass passed, $fail binaries failed"
}
