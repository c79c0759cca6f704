"""A legacy (pre-1.6, non-zip) torch.save file written by calling torch.save twice on one open
file: two records back to back, of which torch.load reads the first and ignores the rest, for the
`.pth` reader: tests/data/legacy_twice.pth.

- the first record: {"w": torch.arange(6.).reshape(2, 3)};
- the second: {"w": torch.zeros(1)} (what a reader that took the last record would give).

    python3 tools/golden/make_legacy_twice.py tests/data
"""
import sys

import torch

out = sys.argv[1]
path = f"{out}/legacy_twice.pth"
first = {"w": torch.arange(6.0).reshape(2, 3)}
with open(path, "wb") as f:
    torch.save(first, f, _use_new_zipfile_serialization=False)
    end_of_first = f.tell()
    torch.save({"w": torch.zeros(1)}, f, _use_new_zipfile_serialization=False)
# torch.load reads the first record, whichever loader.
for weights_only in (True, False):
    got = torch.load(path, weights_only=weights_only)
    assert list(got) == ["w"] and torch.equal(got["w"], first["w"]), got
with open(path, "rb") as f:
    data = f.read()
assert len(data) > end_of_first
print(f"{path}: {len(data)} bytes, the first record {end_of_first}")
