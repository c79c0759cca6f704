"""PEFT adapters that carry base parameters, on the reference's half_precision BigNet (width 20,
tests/data/bignet_d20.pth), for what PEFT does with them there: it copies them into the
HalfLinear's f16 parameters (`bias="all"`) or an f16 copy of the module (`modules_to_save`),
so their values are rounded to f16.

- tests/data/peft_half_base/bias_all/: rank 4, alpha 8, target_modules model.0.model.{0,2},
  bias="all", every base parameter PEFT saves moved off the base by 0.3 * N(0, 1);
- tests/data/peft_half_base/mts_linear/: the same with modules_to_save=["model.2.model.4"];
- tests/data/peft_half_base/io.safetensors: `x` [6, 20] and `y_bias_all`, `y_mts_linear`:
  PeftModel.from_pretrained(load("half_precision", base), dir)'s outputs (PEFT 0.21).

    python3 tools/golden/make_peft_half_base.py tests/data ../shared/ref
"""
import io
import contextlib
import os
import shutil
import sys
import torch
from safetensors.torch import save_file
from peft import LoraConfig, PeftModel, get_peft_model

out = sys.argv[1]
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "../shared/ref")
import bignet_ref as R  # noqa: E402

D = 20
base = torch.load(f"{out}/bignet_d20.pth")
root = f"{out}/peft_half_base"
os.makedirs(root, exist_ok=True)
torch.manual_seed(46)
x = torch.randn(6, D)
tensors = {"x": x}
for name, extra in (("bias_all", dict(bias="all")), ("mts_linear", dict(modules_to_save=["model.2.model.4"]))):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.0\.model\.[02]", init_lora_weights=False, **extra)
    pm = get_peft_model(R.load("bignet", base, D), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and "lora" not in n:
                p.add_(0.3 * torch.randn_like(p))
    d = f"{root}/{name}"
    shutil.rmtree(d, ignore_errors=True)
    pm.save_pretrained(d)
    with contextlib.redirect_stderr(io.StringIO()):
        ref = PeftModel.from_pretrained(R.load("half_precision", base, D), d).eval()
    with torch.no_grad():
        tensors[f"y_{name}"] = ref(x).contiguous()
    if os.path.exists(f"{d}/README.md"):
        os.remove(f"{d}/README.md")
save_file(tensors, f"{root}/io.safetensors")
