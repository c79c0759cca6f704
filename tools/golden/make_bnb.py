"""Golden data for reading bitsandbytes' 4-bit layout (`bnb.nn.Linear4bit` state dicts), made on
CPU with bitsandbytes 0.50.2 and torch 2.15:

- tests/data/bnb_seq.safetensors: a Sequential (Linear 23->37, ReLU, Linear 37->41, Tanh,
  Linear 41->7 without bias) of Linear4bit NF4 layers, plain absmax; bnb_seq_dq.pth: the same
  model double-quantized (compress_statistics), as torch.save writes it;
  bnb_seq_io.safetensors: `x` [50, 23], `labels` [50] i64, `logits` / `logits_dq` [50, 7]:
  bitsandbytes' own forward of each.
- tests/data/bignet_bnb_dq_d64.safetensors: a BigNet of width 64 with every Linear an NF4
  double-quantized Linear4bit; bignet_bnb_io_d64.safetensors: `x` [6, 64] and `y` [6, 64].

    python3 tools/golden/make_bnb.py tests/data /path/to/shared/ref
"""
import sys
import warnings
import torch
import bitsandbytes as bnb
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
out, ref = sys.argv[1], sys.argv[2]
sys.path.insert(0, ref)
import bignet_ref as R  # noqa: E402


def linear4bit(lin, double):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=double, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, blocksize=64,
                                 compress_statistics=double, quant_type="nf4")._quantize("cpu")
    return q


def contiguous(sd):
    return {k: v.contiguous() for k, v in sd.items()}


torch.manual_seed(3)
x = torch.randn(50, 23)
labels = torch.randint(0, 7, (50,))
torch.manual_seed(5)
layers = [torch.nn.Linear(23, 37), torch.nn.Linear(37, 41), torch.nn.Linear(41, 7, bias=False)]
io = {"x": x, "labels": labels}
for double in (False, True):
    q = [linear4bit(l, double) for l in layers]
    m = torch.nn.Sequential(q[0], torch.nn.ReLU(), q[1], torch.nn.Tanh(), q[2])
    with torch.no_grad():
        io["logits_dq" if double else "logits"] = m(x).float()
    if double:
        torch.save(m.state_dict(), f"{out}/bnb_seq_dq.pth")
    else:
        save_file(contiguous(m.state_dict()), f"{out}/bnb_seq.safetensors")
save_file(io, f"{out}/bnb_seq_io.safetensors")

D = 64
torch.manual_seed(11)
net = R.Net("bignet", D)
for blk in net.model:
    if isinstance(blk, R.Block):
        for i in (0, 2, 4):
            blk.model[i] = linear4bit(blk.model[i], True)
xb = torch.randn(6, D)
with torch.no_grad():
    yb = net(xb)
save_file(contiguous(net.state_dict()), f"{out}/bignet_bnb_dq_d64.safetensors")
save_file({"x": xb, "y": yb.float()}, f"{out}/bignet_bnb_io_d64.safetensors")
print("ok")
