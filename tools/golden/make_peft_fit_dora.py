"""Golden data for `bignet fit --adapter` over a PEFT DoRA adapter (`use_dora`).

PEFT trains a DoRA adapter's magnitudes with its lora_A and lora_B, and computes each layer's
weight norm ‖W + s·B·A‖ again at every forward from the current A and B, detached (a constant
in the backward). This script makes a DoRA adapter (r = 4, lora_alpha = 8, every Linear) on
the width-20 BigNet of `tests/data/bignet_d20.pth`, moves B and the magnitudes off their
start (so that B·A and magnitude / norm are not trivial), trains it with PyTorch's AdamW
(lr 1e-3) for 8 steps on the task `bignet fit --seed 3` trains on (its data and head rebuilt
with nibble's generator, as in `make_peft_fit_scaled.py`), and writes the adapter before and
after training and PEFT's losses to `tests/data/peft_fit_dora/` (test:
`crates/bignet/tests/cli.rs`, `fit_trains_peft_dora_adapters_as_peft_does`).

Run from the repository root with torch and peft installed:
    python tools/golden/make_peft_fit_dora.py /path/to/shared/ref
"""
import json, os, shutil, sys

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_peft_fit_scaled import R, fit_task, peft_fit  # noqa: E402


def main():
    torch.set_num_threads(1)
    dim, seed, steps = 20, 3, 8
    out = "tests/data/peft_fit_dora"
    sd = torch.load("tests/data/bignet_d20.pth")
    head, x = fit_task(dim, 1000, seed)
    cfg = dict(r=4, lora_alpha=8, use_dora=True, target_modules=r"model\.\d+\.model\.[024]")
    torch.manual_seed(1)
    model = get_peft_model(R.load("bignet", sd, dim), LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(f"{out}/start")
    losses = peft_fit(model, head, x, steps)
    model.save_pretrained(f"{out}/trained")
    with open(f"{out}/losses.json", "w") as f:
        json.dump({"dim": dim, "seed": seed, "steps": steps, "lr": 1e-3, "losses": losses}, f, indent=1)


if __name__ == "__main__":
    main()
