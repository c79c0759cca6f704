"""Writes scikit-learn's handwritten digits as the safetensors data file nibble reads.

The data: `sklearn.datasets.load_digits` (1797 8x8 images of the digits 0-9, 16 grey levels,
shipped with scikit-learn). A fixed stratified split (360 test rows, `random_state=0`); features
scaled to [0, 1] by dividing by 16.

Output (default `tests/data/digits.safetensors`):
  x_train f32 [1437, 64], y_train u8 [1437], x_test f32 [360, 64], y_test u8 [360].

    python tools/digits/make_digits.py [OUTPUT]
"""

import sys

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_ROWS = 360
SEED = 0


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/digits.safetensors"
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_ROWS, random_state=SEED, stratify=y
    )
    tensors = {
        "x_train": np.ascontiguousarray(x_train),
        "y_train": np.ascontiguousarray(y_train),
        "x_test": np.ascontiguousarray(x_test),
        "y_test": np.ascontiguousarray(y_test),
    }
    save_file(tensors, out, metadata={"source": "sklearn.datasets.load_digits", "scale": "x/16"})
    for k, v in tensors.items():
        print(f"{k}: {v.dtype} {list(v.shape)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
