"""Golden data for bitsandbytes' other layouts, made on CPU with bitsandbytes 0.50.2 and torch
2.15 (the 4-bit NF4 files with blocks of 64 are make_bnb.py's):

- tests/data/bnb_fp4_seq.safetensors: a Sequential (Linear 23->37, ReLU, Linear 37->41, Tanh,
  Linear 41->7 without bias) of Linear4bit layers: FP4 with blocks of 64 and plain absmax, FP4
  with blocks of 128 and double quantization, NF4 with blocks of 256 and double quantization
  (read dequantized to f32).
- tests/data/bnb_int8_seq.pth: the same Sequential of Linear8bitLt layers
  (has_fp16_weights=False), as torch.save writes it (`weight` i8, `SCB`, `weight_format`).
- tests/data/bnb_qstorage_seq.pth: Linear4bit(64, 37), ReLU, Linear4bit(37, 8), NF4
  double-quantized with `quant_storage` bf16 and f16 (the codes' bytes as those elements).
- tests/data/bnb_more_io.safetensors: `x` [50, 23], `labels` [50] i64, `logits_fp4` and
  `logits_int8` [50, 7]: bitsandbytes' own forward of each; `x_qs` [6, 64] and `logits_qs`
  [6, 8] for the quant_storage model.
- tests/data/bignet_bnb8_d64.safetensors: a BigNet of width 64 with every Linear a
  Linear8bitLt; bignet_bnb8_io_d64.safetensors: `x` [6, 64] and `y` [6, 64].
- tests/data/bignet_bnb_fp4_d64.safetensors: a BigNet of width 64 with every Linear an FP4
  Linear4bit (blocks of 64, double-quantized); bignet_bnb_fp4_io_d64.safetensors: `x`, `y`.

    python3 tools/golden/make_bnb_more.py tests/data /path/to/shared/ref
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


def linear4bit(lin, quant_type, blocksize, double):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, compress_statistics=double,
                          quant_type=quant_type)
    q.load_state_dict(lin.state_dict())
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                 blocksize=blocksize, compress_statistics=double,
                                 quant_type=quant_type)._quantize("cpu")
    return q


def linear8bit(lin):
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


def contiguous(sd):
    return {k: v.contiguous() for k, v in sd.items()}


torch.manual_seed(3)
x = torch.randn(50, 23)
labels = torch.randint(0, 7, (50,))
torch.manual_seed(7)
layers = [torch.nn.Linear(23, 37), torch.nn.Linear(37, 41), torch.nn.Linear(41, 7, bias=False)]
io = {"x": x, "labels": labels}
q = [linear4bit(layers[0], "fp4", 64, False), linear4bit(layers[1], "fp4", 128, True),
     linear4bit(layers[2], "nf4", 256, True)]
m = torch.nn.Sequential(q[0], torch.nn.ReLU(), q[1], torch.nn.Tanh(), q[2])
with torch.no_grad():
    io["logits_fp4"] = m(x).float()
save_file(contiguous(m.state_dict()), f"{out}/bnb_fp4_seq.safetensors")
q = [linear8bit(l) for l in layers]
m = torch.nn.Sequential(q[0], torch.nn.ReLU(), q[1], torch.nn.Tanh(), q[2])
with torch.no_grad():
    io["logits_int8"] = m(x).float()
torch.save(m.state_dict(), f"{out}/bnb_int8_seq.pth")
# quant_storage (FSDP-QLoRA): the codes' bytes held as bf16 and f16 elements.
torch.manual_seed(9)
wide = [torch.nn.Linear(64, 37), torch.nn.Linear(37, 8)]
qs = []
for lin, storage in zip(wide, (torch.bfloat16, torch.float16)):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32,
                          quant_type="nf4", quant_storage=storage)
    q.load_state_dict(lin.state_dict())
    qs.append(q.to("cpu"))
m = torch.nn.Sequential(qs[0], torch.nn.ReLU(), qs[1])
io["x_qs"] = torch.randn(6, 64)
with torch.no_grad():
    io["logits_qs"] = m(io["x_qs"]).float()
torch.save(m.state_dict(), f"{out}/bnb_qstorage_seq.pth")
save_file(io, f"{out}/bnb_more_io.safetensors")

D = 64
torch.manual_seed(13)
net = R.Net("bignet", D)
for blk in net.model:
    if isinstance(blk, R.Block):
        for i in (0, 2, 4):
            blk.model[i] = linear8bit(blk.model[i])
xb = torch.randn(6, D)
with torch.no_grad():
    yb = net(xb)
save_file(contiguous(net.state_dict()), f"{out}/bignet_bnb8_d64.safetensors")
save_file({"x": xb, "y": yb.float()}, f"{out}/bignet_bnb8_io_d64.safetensors")
print("ok")

# A BigNet whose Linears are FP4 (blocks of 64, double-quantized): read as f32 weights.
torch.manual_seed(15)
net = R.Net("bignet", D)
for blk in net.model:
    if isinstance(blk, R.Block):
        for i in (0, 2, 4):
            blk.model[i] = linear4bit(blk.model[i], "fp4", 64, True)
xb = torch.randn(6, D)
with torch.no_grad():
    yb = net(xb)
save_file(contiguous(net.state_dict()), f"{out}/bignet_bnb_fp4_d64.safetensors")
save_file({"x": xb, "y": yb.float()}, f"{out}/bignet_bnb_fp4_io_d64.safetensors")
print("ok fp4 bignet")
