"""Whole pickled models (`torch.save(model)`, not a state dict) and the state dicts PyTorch
gives for them: tests/data/whole_seq.pth (an nn.Sequential of Linear(bias=False), GELU,
LayerNorm, a module of this script's own class (`__main__.Scaled`: a parameter, a persistent and
a non-persistent buffer, a dtype and a device attribute, a load-state-dict hook), Linear and
BatchNorm1d; tests/data/whole_seq_in_dict.pth keeps it under "model" beside an epoch and a
note; tests/data/whole_seq_legacy.pth in the legacy format;
tests/data/whole_beside_state_dict.pth its state dict under "state_dict" beside another model), tests/data/whole_bignet_low_d20.pth (the reference's low_precision Net at width 20,
`bignet_ref.Net`, whose 4-bit buffers are not persistent and whose modules carry hooks), and
tests/data/whole_models_sd.safetensors: `seq.<key>` and `low.<key>` for each key of the two
models' `state_dict()` (integer buffers as int64), in order under `__metadata__` `seq_keys` /
`low_keys` (comma-separated). For the `nibble` program: tests/data/whole_mix.pth (inside
DataParallel, an nn.Sequential whose activations, norms and epsilons a state dict cannot tell)
with `x` [5,6] and PyTorch's `logits` in tests/data/whole_mix_io.safetensors, and
tests/data/whole_softmax_end.pth (a Linear then a Softmax), and tests/data/whole_subclass.pth
(`__main__.MyLinear`, a subclass of nn.Linear, Tanh, Linear) with its `logits` on the same `x`
in tests/data/whole_subclass_io.safetensors; tests/data/whole_bn_batch_stats.pth holds a
BatchNorm1d(track_running_stats=False); tests/data/whole_nested.pth nests Sequentials (Linear,
Sequential(LeakyReLU(0.3), Sequential(Linear, Tanh)), Linear), its `logits` in
tests/data/whole_nested_io.safetensors.

    python3 tools/golden/make_whole_models.py tests/data ../shared/ref
"""
import sys
import torch
from safetensors.torch import save_file

out = sys.argv[1]
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "../shared/ref")
import bignet_ref as R  # noqa: E402


class Scaled(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.register_buffer("offset", torch.linspace(-1, 1, d))
        self.register_buffer("scratch", torch.zeros(d), persistent=False)
        self.dtype = torch.float16
        self.device = torch.device("cpu")
        self._register_load_state_dict_pre_hook(Scaled._hook, with_module=True)

    def _hook(self, sd, prefix, *args):
        pass

    def forward(self, x):
        return x * self.gain + self.offset


torch.manual_seed(11)
seq = torch.nn.Sequential(torch.nn.Linear(7, 9, bias=False), torch.nn.GELU(), torch.nn.LayerNorm(9),
                          Scaled(9), torch.nn.Linear(9, 4), torch.nn.BatchNorm1d(4))
with torch.no_grad():
    seq[5].running_mean.normal_()
    seq[5].running_var.uniform_(0.5, 2.0)
seq[5].num_batches_tracked += 3
torch.save(seq, f"{out}/whole_seq.pth")
# The legacy format (module classes as persistent ids with their source).
torch.save(seq, f"{out}/whole_seq_legacy.pth", _use_new_zipfile_serialization=False)
# A training checkpoint that keeps the whole model beside other things.
torch.save({"epoch": 3, "model": seq, "note": "whole"}, f"{out}/whole_seq_in_dict.pth")
# A state dict beside a whole model of other layers: the state dict is read ("state_dict" comes
# first among the names of a state dict), and nothing of the other model goes with it.
torch.save({"state_dict": seq.state_dict(), "model": torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())},
           f"{out}/whole_beside_state_dict.pth")
low = R.Net("low_precision", 20)
torch.save(low, f"{out}/whole_bignet_low_d20.pth")
tensors, meta = {}, {}
for name, model in (("seq", seq), ("low", low)):
    sd = model.state_dict()
    meta[f"{name}_keys"] = ",".join(sd.keys())
    for k, v in sd.items():
        tensors[f"{name}.{k}"] = v.detach().clone().contiguous()
save_file(tensors, f"{out}/whole_models_sd.safetensors", metadata=meta)

# For the `nibble` program: a whole model whose layers a state dict could not tell (dropout in
# front, LeakyReLU(0.2), LayerNorm(eps=1e-3), GELU(tanh), a LayerNorm without affine, SiLU,
# RMSNorm(eps=1e-4)) inside DataParallel, its logits on x; and one ending with a Softmax.
torch.manual_seed(12)
N = torch.nn
mix = N.DataParallel(N.Sequential(
    N.Dropout(0.1), N.Linear(6, 10), N.LeakyReLU(0.2), N.LayerNorm(10, eps=1e-3),
    N.GELU(approximate="tanh"), N.Linear(10, 8), N.LayerNorm(8, elementwise_affine=False, eps=1e-3),
    N.SiLU(), N.RMSNorm(8, eps=1e-4), N.Linear(8, 3)))
mix.eval()
with torch.no_grad():
    for p in mix.parameters():
        p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(5, 6)
    save_file({"x": x, "logits": mix(x)}, f"{out}/whole_mix_io.safetensors")
torch.save(mix, f"{out}/whole_mix.pth")
torch.save(N.Sequential(N.Linear(6, 3), N.Softmax(dim=1)), f"{out}/whole_softmax_end.pth")


class MyLinear(N.Linear):
    """A subclass of nn.Linear: a Linear to a reader of its tensors."""


torch.manual_seed(13)
sub = N.Sequential(MyLinear(6, 8), N.Tanh(), N.Linear(8, 3))
sub.eval()
with torch.no_grad():
    save_file({"x": x, "logits": sub(x)}, f"{out}/whole_subclass_io.safetensors")
torch.save(sub, f"{out}/whole_subclass.pth")
# Sequentials nested in a Sequential (keys `0.weight`, `1.1.0.weight`, ...: run as one chain).
torch.manual_seed(14)
nested = N.Sequential(N.Linear(6, 8), N.Sequential(N.LeakyReLU(0.3), N.Sequential(N.Linear(8, 8), N.Tanh())),
                      N.Linear(8, 3))
nested.eval()
with torch.no_grad():
    save_file({"x": x, "logits": nested(x)}, f"{out}/whole_nested_io.safetensors")
torch.save(nested, f"{out}/whole_nested.pth")
# A BatchNorm1d without running statistics (it normalizes each batch by its own).
torch.save(N.Sequential(N.Linear(6, 8), N.BatchNorm1d(8, track_running_stats=False), N.ReLU(),
                        N.Linear(8, 3)), f"{out}/whole_bn_batch_stats.pth")
print("ok", meta)
