"""Golden data for bitsandbytes NF4 weights whose rows are not whole blocks of 64 but a
multiple of 16 long (in 48 and 32), made on CPU with bitsandbytes 0.50.2 and torch 2.15:

- tests/data/bnb_rows_seq.pth: `nn.Sequential(Linear4bit(48, 32), ReLU, Linear4bit(32, 5))`,
  NF4 with blocks of 64, the first plain, the second double-quantized, as torch.save writes it;
- tests/data/bnb_rows_io.safetensors: `x` [6, 48], `labels` [6] and `logits` [6, 5]: the forward
  with each weight decoded over its flattened blocks, as bitsandbytes' quantizer made them and
  its scalar CPU path decodes them (`_dequantize_4bit_compute`). bitsandbytes' AVX-512 CPU kernel
  takes other blocks' absmaxes for such rows (`row·⌊in/64⌋ + ⌊col/64⌋`), so its own forward on
  an AVX-512 CPU differs; `logits_bnb_here` is that forward on the machine that made the file.

    python3 tools/golden/make_bnb_partial_rows.py tests/data
"""
import sys
import warnings
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as BF
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
out = sys.argv[1]
torch.manual_seed(41)


def linear4bit(lin, double):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32,
                          compress_statistics=double, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, blocksize=64,
                                 compress_statistics=double, quant_type="nf4")._quantize("cpu")
    q.bias = torch.nn.Parameter(lin.bias.data.clone())
    return q


def flat_weight(q):
    """The weight decoded block by block over the flattened matrix."""
    qs = q.weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    packed = q.weight.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1).long()
    n = qs.shape[0] * qs.shape[1]
    levels = qs.code[codes[:n]]
    scale = absmax.float().repeat_interleave(64)[:n]
    return (levels * scale).reshape(qs.shape)


l0, l2 = torch.nn.Linear(48, 32), torch.nn.Linear(32, 5)
model = torch.nn.Sequential(linear4bit(l0, False), torch.nn.ReLU(), linear4bit(l2, True))
torch.save(model.state_dict(), f"{out}/bnb_rows_seq.pth")
x = torch.randn(6, 48)
with torch.no_grad():
    h = torch.relu(torch.nn.functional.linear(x, flat_weight(model[0]), model[0].bias))
    logits = torch.nn.functional.linear(h, flat_weight(model[2]), model[2].bias)
    here = model(x)
save_file({"x": x, "labels": torch.tensor([0, 1, 2, 3, 4, 0]), "logits": logits,
           "logits_bnb_here": here}, f"{out}/bnb_rows_io.safetensors")
print("flat vs bitsandbytes' forward here:", (logits - here).abs().max().item())
