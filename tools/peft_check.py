"""Checks that a `nibble finetune --save-adapter DIR` adapter loads in PEFT and gives nibble's logits.

    nibble finetune --model M --data D --format F --rank R --steps N --save-adapter DIR
    nibble eval --model M --data D --format f32 --adapter DIR --logits nibble_logits.safetensors
    python tools/peft_check.py --model M --data D --adapter DIR --logits nibble_logits.safetensors

The PyTorch model is rebuilt from the state dict the way nibble reads it: keys `{i}.weight` /
`{i}.bias` of an `nn.Sequential`, a 2-D weight is a Linear, a 1-D one a LayerNorm, a gap in the
indices an activation (`--activation relu|gelu`, or a comma-separated list, one per gap).
`PeftModel.from_pretrained` puts the adapter on it (target modules named by index) and the
logits on `x_test` are compared with nibble's (`logits` in the file `nibble eval --logits` wrote,
computed with the same f32 base). With `--save FILE` PEFT's logits are written too, as `logits`.
Exits 1 when the largest |difference| exceeds `--tol`.
"""

import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn


def sequential_from_state_dict(sd: dict, activations: list[str]) -> nn.Sequential:
    indices = sorted({int(k.split(".")[0]) for k in sd})
    layers: list[nn.Module] = []
    gap = 0
    for i in range(indices[-1] + 1):
        w = sd.get(f"{i}.weight")
        if w is None:
            act = activations[min(gap, len(activations) - 1)]
            layers.append(nn.GELU() if act == "gelu" else nn.ReLU())
            gap += 1
        elif w.dim() == 2:
            layers.append(nn.Linear(w.shape[1], w.shape[0], bias=f"{i}.bias" in sd))
        else:
            layers.append(nn.LayerNorm(w.shape[0]))
    model = nn.Sequential(*layers)
    model.load_state_dict(sd)
    return model


def load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--logits", help="nibble's logits (safetensors, key `logits`)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--save", help="write PEFT's logits here")
    args = p.parse_args()

    model = sequential_from_state_dict(load_state_dict(args.model), args.activation.split(","))
    base = model(load_file(args.data)["x_test"]).detach()
    peft_model = PeftModel.from_pretrained(model, args.adapter)
    peft_model.eval()
    x = load_file(args.data)["x_test"]
    with torch.no_grad():
        logits = peft_model(x)
    print(f"PEFT loaded {args.adapter}: {peft_model.peft_config['default'].target_modules}, "
          f"r={peft_model.peft_config['default'].r}")
    print(f"adapter moves the logits by max |d| {(logits - base).abs().max().item():.4g}")
    if args.save:
        save_file({"logits": logits.contiguous()}, args.save)
    if args.logits:
        ours = load_file(args.logits)["logits"]
        if ours.shape != logits.shape:
            print(f"shape mismatch: nibble {list(ours.shape)} vs PEFT {list(logits.shape)}")
            sys.exit(1)
        diff = (ours - logits).abs()
        print(f"nibble vs PEFT logits: max |d| {diff.max().item():.3g}, "
              f"mean |d| {diff.mean().item():.3g} over {list(logits.shape)}")
        if diff.max().item() > args.tol:
            print(f"FAIL: above --tol {args.tol}")
            sys.exit(1)
        print("OK")


if __name__ == "__main__":
    main()
