"""Image files: read for what they hold (8-bit and 16-bit grey, transparency refused), as tensors in
[-1, 1], and written atomically (a grid of samples, one image).

    image = image_tensor(open_image("digit.png", "L"), channels=1)       # (1, H, W) in [-1, 1]
    save_grid(images, "samples.png", nrow=8)                             # (N, C, H, W) in [-1, 1]
"""
import math
import os

import numpy as np
import torch
from PIL import Image

from checkpoints import atomic_write
from common import UserError

# PIL's modes of 8-bit pixels (converted to grey or RGB as asked) and of 16-bit greyscale ('I',
# 32-bit integers, is how PIL opens some 16-bit files)
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_image(path, mode):
    """An image file -> a PIL image in `mode` ("L" or "RGB"); 16-bit greyscale -> a float image
    ("F") of its full depth on the same 0-255 scale (PIL's conversion to "L" clips it at 255).
    image_tensor reads either. A file PIL cannot read, or of another depth (floats, 32-bit
    integers past 16 bits), is named."""
    try:
        with Image.open(path) as image:
            alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if alpha and image.convert("RGBA").getextrema()[3][0] < 255:
                # a transparent pixel's colour is not what it shows (a digit drawn in the alpha
                # channel reads as black): no rule guesses the background, so it is refused
                raise UserError(f"{path}: has transparent pixels (an alpha channel below 255); "
                                "flatten it onto its background and save it without alpha")
            if image.mode in EIGHT_BIT_MODES:
                return image.convert(mode)
            grey = image.convert("F") if image.mode in SIXTEEN_BIT_GREY_MODES else None
            # mode I holds 32-bit integers: 16-bit grey only when they fit (other modes: no range)
            low, high = grey.getextrema() if grey else (0, -1)
            if not 0 <= low <= high <= 65535:
                raise UserError(f"{path}: PIL mode {image.mode!r} is not one we read (8-bit "
                                "pixels, or 16-bit greyscale in 0..65535); save it as an 8- or "
                                "16-bit PNG")
            return grey.point(lambda value: value * (255 / 65535))
    except OSError as e:  # PIL's UnidentifiedImageError included
        raise UserError(f"{path}: not an image PIL can read ({e})") from None


def image_tensor(image, channels):
    """An image of open_image -> (channels, H, W) in [-1, 1] (a grey image repeated to 3)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32))  # (H, W) or (H, W, C)
    pixels = pixels.view(*pixels.shape[:2], -1).permute(2, 0, 1)  # (C, H, W)
    return pixels.expand(channels, -1, -1) / 127.5 - 1


def save_grid(images, path, nrow):
    """images (N, C, H, W) in [-1, 1], C = 1 or 3 -> one image file (a PNG, or path's format),
    nrow images a row; small images upscaled 2x for viewing."""
    n, c, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + 2), nrow * (w + 2)), -1.0)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = r * (h + 2) + 1, col * (w + 2) + 1
        grid[:, top:top + h, left:left + w] = img
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).squeeze(2)
    image = Image.fromarray(pixels.numpy())
    save_image(image.resize((image.width * 2, image.height * 2), Image.NEAREST) if h < 256
               else image, path)


def save_image(image, path):
    """A PIL image in the format of path's extension, written atomically."""
    kind = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    atomic_write(path, lambda tmp: image.save(tmp, format=kind))

