"""PEFT's logits for the golden DoRA adapter (tests/data/peft_variants/dora, made by
make_peft_dora.py) with its `lora_magnitude_vector`s taken out of the file: PEFT 0.21.2 keeps
the magnitudes it computed when it created the layers, the base weight's row norms (B starts at
zero), and loads the rest. Writes tests/data/peft_variants/dora_no_magnitude_logits.safetensors
(`logits` [8,5] for `x` of dora_logits.safetensors).

    python3 tools/golden/make_peft_dora_no_magnitude.py tests/data
"""
import json
import os
import shutil
import sys
import tempfile
import torch
import peft
from safetensors.torch import load_file, save_file

out = sys.argv[1]
base = torch.nn.Sequential(torch.nn.Linear(30, 48), torch.nn.GELU(), torch.nn.LayerNorm(48),
                           torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))
base.load_state_dict(torch.load(f"{out}/seq_d30.pth"))
base.eval()
x = load_file(f"{out}/peft_variants/dora_logits.safetensors")["x"]
src = f"{out}/peft_variants/dora"
with tempfile.TemporaryDirectory() as tmp:
    shutil.copy(f"{src}/adapter_config.json", tmp)
    weights = load_file(f"{src}/adapter_model.safetensors")
    kept = {k: v for k, v in weights.items() if "magnitude" not in k}
    assert len(kept) < len(weights)
    save_file(kept, f"{tmp}/adapter_model.safetensors")
    m = peft.PeftModel.from_pretrained(base, tmp)
    m.eval()
    with torch.no_grad():
        logits = m(x)
        for name, mod in m.named_modules():
            if hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                w = mod.base_layer.weight
                mag = mod.lora_magnitude_vector["default"].weight
                print(name, "magnitude - row norms of W:", (mag - w.norm(dim=1)).abs().max().item())
save_file({"x": x, "logits": logits}, f"{out}/peft_variants/dora_no_magnitude_logits.safetensors")
print(logits[:2])
