"""Checkpoints in PyTorch's legacy (pre-1.6, non-zip) torch.save format, beside the same state
dicts in the zip format, for the `.pth` reader: tests/data/legacy_*.pth and legacy_*_zip.pth.

- legacy_mixed: f32, f16, i64 and bool tensors, a transposed (non-contiguous) one, two tensors
  sharing one storage (a weight and a slice of it), and an empty one;
- legacy_mixed_p4: the same saved with pickle_protocol=4;
- legacy_tutorial: {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt} of
  nn.Sequential(Linear(4,3), ReLU(), Linear(3,2)) after one Adam step;
- legacy_protocol1 and zip_protocol1: a one-tensor state dict in pickle protocol 1 (refused).

    python3 tools/golden/make_legacy_pth.py tests/data
"""
import sys
from collections import OrderedDict
import torch

out = sys.argv[1]
torch.manual_seed(5)
w = torch.randn(4, 6)
mixed = OrderedDict(
    [
        ("fc.weight", w),
        ("fc.weight_t", torch.randn(3, 5).t()),
        ("fc.row", w[1]),
        ("half", torch.randn(7).half()),
        ("steps", torch.tensor([3, -1, 2**40])),
        ("mask", torch.tensor([True, False, True])),
        ("empty", torch.zeros(0, 3)),
    ]
)
for name, kw in [("legacy_mixed", {}), ("legacy_mixed_p4", {"pickle_protocol": 4})]:
    torch.save(mixed, f"{out}/{name}.pth", _use_new_zipfile_serialization=False, **kw)
torch.save(mixed, f"{out}/legacy_mixed_zip.pth")

m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
opt = torch.optim.Adam(m.parameters(), lr=0.1)
m(torch.randn(5, 4)).pow(2).sum().backward()
opt.step()
ckpt = {"epoch": 3, "model_state_dict": m.state_dict(), "optimizer_state_dict": opt.state_dict()}
torch.save(ckpt, f"{out}/legacy_tutorial.pth", _use_new_zipfile_serialization=False)
torch.save(ckpt, f"{out}/legacy_tutorial_zip.pth")

# Pickle protocol 1 (no PROTO opcode), in both formats: refused, as torch.load(weights_only=True)
# refuses it.
small = OrderedDict([("w", torch.ones(2, 2))])
torch.save(small, f"{out}/legacy_protocol1.pth", pickle_protocol=1, _use_new_zipfile_serialization=False)
torch.save(small, f"{out}/zip_protocol1.pth", pickle_protocol=1)
