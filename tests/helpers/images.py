"""Crafted image files, one per case the decoder must handle (tasks/images.py), and what each must decode to."""
from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image

from tasks.images import BACKGROUND

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # the value a phone writes when it was held upright


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def raw_png(pixels: np.ndarray, color_type: int, extra_chunks: bytes = b"") -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour): big-endian samples, filter 0 on every row."""
    height, width = pixels.shape[:2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    rows = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1).tobytes()
    stride = len(rows) // height
    data = b"".join(b"\x00" + rows[row * stride:(row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + extra_chunks
            + png_chunk(b"IDAT", zlib.compress(data)) + png_chunk(b"IEND", b""))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def halves(width: int, height: int, left, right) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :width // 2], pixels[:, width // 2:] = left, right
    return Image.fromarray(pixels)


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The documented rule, written out: round((colour * a + background * (255 - a)) / 255)."""
    a = alpha.astype(np.float64)[..., np.newaxis] / 255
    return np.floor(rgb * a + np.asarray(BACKGROUND) * (1 - a) + 0.5).astype(np.uint8)


def exif_rotated_jpeg() -> bytes:
    """40 x 20 stored, red left half, blue right half; EXIF says: rotate 90 degrees clockwise to display."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    return encoded(halves(40, 20, RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encoded(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan ink


def gray16_png() -> tuple[bytes, np.ndarray]:
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1021 + 0x00FF).astype(np.uint16)
    return raw_png(values, color_type=0), values


def rgb16_png() -> tuple[bytes, np.ndarray]:
    values = np.random.default_rng(3).integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    return raw_png(values, color_type=2), values


def rgba16_png() -> tuple[bytes, np.ndarray]:
    values = np.random.default_rng(4).integers(0, 65536, (6, 7, 4)).astype(np.uint16)
    values[0, :, 3] = 0
    return raw_png(values, color_type=6), values


def rgb16_png_with_transparent_colour() -> tuple[bytes, np.ndarray]:
    """16-bit RGB whose tRNS colour fills row 0; row 1 has the same high bytes, other low ones (opaque)."""
    values = rgb16_png()[1].copy()
    values[0], values[1] = (1000, 2000, 3000), (1001, 2000, 3000)
    key = struct.pack(">HHH", 1000, 2000, 3000)
    return raw_png(values, color_type=2, extra_chunks=png_chunk(b"tRNS", key)), values


def palette_png_with_transparent_index() -> bytes:
    """Index 0 red, index 1 green and transparent (tRNS), in a checkerboard."""
    image = Image.new("P", (8, 8))
    image.putpalette([*RED, *GREEN] + [0] * 762)
    image.putdata([(x + y) % 2 for y in range(8) for x in range(8)])
    return encoded(image, "PNG", transparency=1)


def la_png() -> tuple[bytes, np.ndarray, np.ndarray]:
    gray = np.full((4, 6), 100, np.uint8)
    alpha = np.array([[0, 64, 128, 200, 254, 255]] * 4, np.uint8)
    return encoded(Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]), "PNG"), gray, alpha


def rgba_png_with_garbage_under_transparency(seed: int) -> tuple[bytes, np.ndarray]:
    """The same visible picture each seed; under alpha 0, colours that differ from seed to seed."""
    pixels = noise(10, 12, 4, seed=99)
    pixels[..., 3] = 255
    pixels[:5, :, 3] = 0
    pixels[:5, :, :3] = noise(5, 12, seed=seed)
    return encoded(Image.fromarray(pixels), "PNG"), pixels


def animation(format: str) -> bytes:
    """Two frames: red, then blue."""
    frames = [Image.new("RGB", (10, 8), RED), Image.new("RGB", (10, 8), BLUE)]
    options = {"lossless": True} if format == "WEBP" else {}
    return encoded(frames[0], format, save_all=True, append_images=frames[1:], duration=100, **options)


def transparent_gif() -> bytes:
    image = Image.new("P", (8, 8))
    image.putpalette([*RED, *GREEN] + [0] * 762)
    image.putdata([(x + y) % 2 for y in range(8) for x in range(8)])
    return encoded(image, "GIF", transparency=1)


def low_depth_png(bits: int, palette: bool) -> bytes:
    """A gray or palette PNG of 1, 2 or 4 bits a pixel and no transparency (scans, line art, small clip art)."""
    indices = np.random.default_rng(bits).integers(0, 2**bits, (7, 11)).astype(np.uint8)
    if not palette:
        return encoded(Image.fromarray(indices * (255 // (2**bits - 1))), "PNG", bits=bits)
    image = Image.fromarray(indices, "P")
    image.putpalette([*RED, *GREEN, *BLUE] + list(range(3 * 2**bits - 9)))
    return encoded(image, "PNG", bits=bits)


def palette_bmp() -> bytes:
    """An 8-bit BMP whose palette holds colours (for L, Pillow writes a palette of grays)."""
    image = Image.fromarray(np.random.default_rng(8).integers(0, 2, (5, 9)).astype(np.uint8), "P")
    image.putpalette([*RED, *BLUE] + [0] * 762)
    return encoded(image, "BMP")


def bmp_4_bit() -> bytes:
    """A 4-bit BMP written by hand (Pillow writes 1, 8, 24 and 32 bits): red and blue in a checkerboard."""
    width, height = 5, 3
    row = bytes(((x % 2) << 4) | ((x + 1) % 2) for x in range(0, width + 1, 2))
    rows = b"".join(row + b"\0" * (-len(row) % 4) for _ in range(height))
    palette = bytes([0, 0, 255, 0, 255, 0, 0, 0]) + b"\0" * 56  # BGRx: red, blue
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 4, 0, len(rows), 2835, 2835, 16, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


def rgb555_bmp() -> bytes:
    """A 16-bit BMP (5-5-5 bits a pixel, as screenshots of old tools hold), written by hand."""
    width, height = 4, 2
    pixels = np.array([[0x7C00, 0x03E0, 0x001F, 0x7FFF]] * height, "<u2")
    rows = pixels.tobytes()
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 16, 0, len(rows), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + len(rows), 0, 0, 54) + info + rows


def partial_frame_gif(left: int, top: int) -> bytes:
    """A GIF whose 4 x 3 first frame sits at (left, top) on a 10 x 8 screen: its background shows around it."""
    image = Image.fromarray(noise(3, 4, seed=5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    data = bytearray(encoded(image, "GIF"))
    position = 13 + (3 * 2 ** ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # past the global colour table
    while data[position] == 0x21:  # extension blocks
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    data[6:10] = struct.pack("<HH", 10, 8)
    data[11] = 1  # the background colour's index
    data[position + 1:position + 5] = struct.pack("<HH", left, top)
    return bytes(data)


def large_picture(height: int, width: int, channels: int = 3) -> np.ndarray:
    """A picture large enough to be reduced (tasks.images.REDUCED_SIDE): every pixel differs from its neighbours,
    so each box mean has a remainder to round, and a PNG of it stays small (diagonal stripes)."""
    rows, columns = np.mgrid[0:height, 0:width]
    planes = [(rows * 3 + columns * 5) % 256, (rows * 7 + columns) % 256, (rows + columns * 11) % 256,
              np.where(rows < height // 3, 0, 255)][:channels]  # alpha: the top third transparent
    return np.stack(planes, axis=-1).astype(np.uint8)


def big_endian_gray16_tiff(pixels: np.ndarray) -> bytes:
    """A TIFF written by hand in Motorola byte order ("MM"; Pillow writes "II"): 16-bit gray, one strip."""
    height, width = pixels.shape
    data = pixels.astype(">u2").tobytes()
    tags = [(256, 3, width), (257, 3, height), (258, 3, 16), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 3, height), (279, 4, len(data))]
    directory_size = 2 + 12 * len(tags) + 4
    tags[5] = (273, 4, 8 + directory_size)  # the strip starts right after the directory
    entries = b"".join(struct.pack(">HHI", tag, kind, 1) + (struct.pack(">HH", value, 0) if kind == 3
                                                           else struct.pack(">I", value)) for tag, kind, value in tags)
    return b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", len(tags)) + entries + b"\x00" * 4 + data


def float_tiff() -> tuple[bytes, np.ndarray]:
    """A floating-point gray TIFF with values in [0, 1], and the 8-bit gray it must decode to."""
    values = np.linspace(0.0, 1.0, 6 * 5, dtype=np.float32).reshape(6, 5)
    return encoded(Image.fromarray(values, mode="F"), "TIFF"), np.rint(values.astype(np.float64) * 255).astype(np.uint8)


def crafted_files() -> dict[str, bytes]:
    """Every case by name: what a real dataset or a client may hold (a new dict each call, the files made once)."""
    return dict(_crafted_files())


@functools.cache
def _crafted_files() -> dict[str, bytes]:
    return {
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "cmyk.jpg": cmyk_jpeg(),
        "photo.jpg": encoded(Image.fromarray(noise(20, 30)), "JPEG", quality=90),
        "gray.jpg": encoded(Image.fromarray(noise(20, 30)[..., 0]), "JPEG", quality=90),
        "gray16.png": gray16_png()[0],
        "rgb16.png": rgb16_png()[0],
        "rgba16.png": rgba16_png()[0],
        "rgb16_transparent_colour.png": rgb16_png_with_transparent_colour()[0],
        "palette_transparent.png": palette_png_with_transparent_index(),
        "la.png": la_png()[0],
        "rgba_garbage.png": rgba_png_with_garbage_under_transparency(1)[0],
        "gray.png": encoded(Image.fromarray(noise(9, 11)[..., 0]), "PNG"),
        "animated.gif": animation("GIF"),
        "transparent.gif": transparent_gif(),
        "animated.webp": animation("WEBP"),
        "animated_alpha.webp": encoded(Image.fromarray(noise(8, 10, 4)), "WEBP", save_all=True, lossless=True,
                                       append_images=[Image.new("RGBA", (10, 8), BLUE + (255,))]),
        "animated.png": animation("PNG"),
        "picture.bmp": encoded(Image.fromarray(noise(7, 9)), "BMP"),
        "palette.bmp": palette_bmp(),
        "palette4.bmp": bmp_4_bit(),
        "bilevel.bmp": encoded(Image.fromarray(noise(5, 9)[..., 0] > 127), "BMP"),
        "rgb555.bmp": rgb555_bmp(),
        "gray1.png": low_depth_png(1, palette=False),
        "gray4.png": low_depth_png(4, palette=False),
        "palette2.png": low_depth_png(2, palette=True),
        "palette4.png": low_depth_png(4, palette=True),
        "large_photo.jpg": encoded(Image.fromarray(large_picture(2048, 2100)), "JPEG", quality=90),
        "large_rgba.png": encoded(Image.fromarray(large_picture(2100, 2049, 4)), "PNG", compress_level=1),
        "partial_frame.gif": partial_frame_gif(2, 1),
        "small_first_frame.gif": partial_frame_gif(0, 0),
        "lossless.webp": encoded(Image.fromarray(noise(7, 9, 4)), "WEBP", lossless=True),
        "lossy.webp": encoded(Image.fromarray(noise(16, 16)), "WEBP", quality=80),
        "scan.tif": encoded(Image.fromarray(noise(11, 13)), "TIFF", compression="tiff_lzw"),
        "cmyk.tif": encoded(Image.fromarray(noise(6, 8, 4), mode="CMYK"), "TIFF"),
        "rgba.tif": encoded(Image.fromarray(rgba_png_with_garbage_under_transparency(2)[1]), "TIFF"),
        "gray16_be.tif": big_endian_gray16_tiff(gray16_png()[1]),
        "float.tif": float_tiff()[0],
        "pages.tif": encoded(Image.new("RGB", (10, 8), RED), "TIFF", save_all=True,
                             append_images=[Image.new("RGB", (10, 8), BLUE)]),
    }
