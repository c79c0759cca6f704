"""Checkpoints whose pickles use PyTorch features a plain state dict does not, each with the
values `torch.load` gives in tests/data/pickle_semantics_io.safetensors (key `<file stem>.<key>`,
the keys in order under `__metadata__["<file stem>_keys"]`, comma-separated):

- pickle_neg.pth: tensors with PyTorch's lazy negation bit (`z.conj().imag` of a complex tensor,
  `t._neg_view()`), saved with `metadata = {'neg': True}` (their values are the storage's negated);
- pickle_memo_twice.pth: `{"best": {"epoch": 3, "weights": sd}, "model_ema": ema, "model": sd}`:
  one state dict pickled once and referenced again (`BINGET`) after it was filled; `model` is
  `sd` (not the zeros of `model_ema`);
- whole_p4.pth / whole_p5.pth: a whole nn.Sequential saved with pickle protocol 4 / 5 (its
  modules' `_non_persistent_buffers_set` pickled as EMPTY_SET / ADDITEMS);
- whole_nn_buffer.pth: a whole model with an `nn.Buffer` (saved through
  `torch._tensor._rebuild_from_type_v2`), and pickle_tensor_attr.pth: a state dict whose tensor
  carries an attribute of its own (the same path);
- whole_state_dict_hook.pth: a whole model with a state-dict hook that renames its keys (nibble
  never runs it, so it refuses the file; no values).

    python3 tools/golden/make_pickle_semantics.py tests/data
"""
import collections
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(47)
files = {}

z = torch.randn(4, dtype=torch.cfloat)
neg = collections.OrderedDict(w=z.conj().imag, n=torch.randn(3)._neg_view(), plain=torch.randn(2))
assert neg["w"].is_neg() and neg["n"].is_neg()
torch.save(neg, f"{out}/pickle_neg.pth")
files["pickle_neg"] = neg

sd = collections.OrderedDict(w=torch.randn(2, 3), b=torch.randn(2))
ema = collections.OrderedDict(w=torch.zeros(2, 3), b=torch.zeros(2))
torch.save({"best": {"epoch": 3, "weights": sd}, "model_ema": ema, "model": sd},
           f"{out}/pickle_memo_twice.pth")
files["pickle_memo_twice"] = sd

seq = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                          torch.nn.Linear(4, 2))
seq.eval()
for protocol in (4, 5):
    torch.save(seq, f"{out}/whole_p{protocol}.pth", pickle_protocol=protocol)
    files[f"whole_p{protocol}"] = seq.state_dict()


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Buffer(torch.randn(3))
        self.fc = torch.nn.Linear(3, 2)


torch.save(Scaled(), f"{out}/whole_nn_buffer.pth")
files["whole_nn_buffer"] = torch.load(f"{out}/whole_nn_buffer.pth", weights_only=False).state_dict()
t = torch.randn(3)
t.note = "x"
torch.save({"w": t}, f"{out}/pickle_tensor_attr.pth")
files["pickle_tensor_attr"] = {"w": t}

def rename(module, sd, prefix, meta):
    for k in list(sd):
        sd[k.replace("fc.", "renamed.")] = sd.pop(k)


class Hooked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self._register_state_dict_hook(rename)


torch.save(Hooked(), f"{out}/whole_state_dict_hook.pth")

tensors, meta = {}, {}
for stem, d in files.items():
    meta[f"{stem}_keys"] = ",".join(d.keys())
    for k, v in d.items():
        v = v.detach().resolve_neg().clone().contiguous()
        tensors[f"{stem}.{k}"] = v.long() if v.dtype == torch.int64 else v
# The loads agree with what was saved.
for stem, d in files.items():
    if stem.startswith("pickle_"):
        ld = torch.load(f"{out}/{stem}.pth", weights_only=True)
        ld = ld["model"] if stem == "pickle_memo_twice" else ld
        for k, v in d.items():
            assert torch.equal(ld[k].resolve_neg(), v.resolve_neg()), (stem, k)
save_file(tensors, f"{out}/pickle_semantics_io.safetensors", metadata=meta)
