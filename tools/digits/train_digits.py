"""Trains the digits classifier that `cargo run --release --example digits` quantizes.

    python tools/digits/train_digits.py [DATA] [OUTPUT] [--hidden H1,H2] [--epochs E] [--seed S]

DATA is what make_digits.py wrote (default `tests/data/digits.safetensors`); OUTPUT the
state dict (`torch.save(model.state_dict())`, default `tests/data/digits_mlp.pth`). Beside it,
`<OUTPUT stem>_logits.safetensors` holds PyTorch's `logits` on `x_test` and the mean test
cross-entropy `loss` [1], the golden data nibble's f32 evaluation is tested against.

The model is a PyTorch `nn.Sequential`, so nibble reads its structure from the state dict
(`{i}.weight` / `{i}.bias`; a 2-D weight is a Linear, a 1-D one a LayerNorm, a gap an
activation):

    0 Linear(64, H1), 1 ReLU, 2 LayerNorm(H1), 3 Linear(H1, H2), 4 ReLU, 5 Linear(H2, 10)

The default widths (30, 20) are deliberately not multiples of the 4-bit formats' blocks
(16, 64, 128), and narrow, so that every weight matters and coarse formats lose accuracy.
"""

import argparse

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def build(hidden: tuple[int, int], features: int = 64, classes: int = 10) -> nn.Sequential:
    h1, h2 = hidden
    return nn.Sequential(
        nn.Linear(features, h1),
        nn.ReLU(),
        nn.LayerNorm(h1),
        nn.Linear(h1, h2),
        nn.ReLU(),
        nn.Linear(h2, classes),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data", nargs="?", default="tests/data/digits.safetensors")
    p.add_argument("output", nargs="?", default="tests/data/digits_mlp.pth")
    p.add_argument("--hidden", default="30,20")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    d = load_file(args.data)
    x_train, y_train = d["x_train"], d["y_train"].long()
    x_test, y_test = d["x_test"], d["y_test"].long()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    model = build(hidden, x_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    n = x_train.shape[0]
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            opt.zero_grad()
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x_test)
        acc = (logits.argmax(1) == y_test).float().mean().item()
        test_loss = loss_fn(logits, y_test).item()
        train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
    torch.save(model.state_dict(), args.output)
    golden = args.output.rsplit(".", 1)[0] + "_logits.safetensors"
    save_file({"logits": logits.contiguous(), "loss": torch.tensor([test_loss])}, golden)
    params = sum(p.numel() for p in model.parameters())
    print(f"hidden {hidden}: {params} parameters ({4 * params} bytes f32)")
    print(f"train accuracy {train_acc:.4f}, test accuracy {acc:.4f}, test loss {test_loss:.4f}")
    print(f"wrote {args.output} and {golden}")


if __name__ == "__main__":
    main()
