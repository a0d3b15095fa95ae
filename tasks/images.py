"""TEMPORARY stand-in for the one image decoder (engineer `decoder` owns tasks/images.py): same names, so
batch scoring runs before it lands. At merge take main's version."""
from __future__ import annotations

import io

import numpy as np

from tasks.errors import ImageDecodeError

DECODER_VERSION = "stand-in-0"


def header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as error:
        raise ImageDecodeError(f"cannot read an image header: {error}") from error


def to_rgb(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            if max_pixels is not None and image.size[0] * image.size[1] > max_pixels:
                raise ImageDecodeError(f"{image.size} is above {max_pixels} pixels")
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "P"):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as error:
        raise ImageDecodeError(f"cannot decode image: {error}") from error


def decode(data: bytes, image_size: int) -> np.ndarray:
    from PIL import Image

    rgb = to_rgb(data)
    resized = Image.fromarray(rgb).resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)
