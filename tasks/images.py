"""The one image decoder: encoded bytes in, 8-bit RGB out, the same for every path.

Training, evaluation, the serving check, TFLite scoring, batch scoring and the
report's thumbnails all see an image as `to_rgb` makes it:

- JPEG, PNG, GIF, BMP, WebP and TIFF (scans, camera and print exports) are
  accepted, recognised by their signature (never by the file name); anything
  else is refused with ImageDecodeError.
- The size is read from the file header by our own parser (`header_size`)
  and limited before a single pixel is decoded: a few kilobytes can declare
  100,000 x 100,000 pixels, and a file the decoding library refuses to judge
  is still measured.
- EXIF orientation is applied (phone photos are stored sideways).
- Alpha (RGBA, grayscale + alpha, a palette's or a colour's transparency) is
  composited onto BACKGROUND: the colours an encoder leaves under fully
  transparent pixels are arbitrary, and a model would learn them. BMP is
  opaque (its fourth byte is padding in most files).
- Grayscale, palette, CMYK (naive conversion, no ICC profile) and 16-bit
  images become 8-bit RGB; 16 bits keep their high byte (x >> 8), and a
  transparent colour of 16 bits is matched on all 16 (`_key_out_rgb16`).
- Animations (GIF, WebP, APNG) and multi-page TIFFs give their first frame;
  a floating-point TIFF in [0, 1] is scaled to [0, 255], any other is clipped.
- An image whose shorter side is at least twice REDUCED_SIDE is reduced by the
  largest whole factor that keeps that side at least REDUCED_SIDE long: each
  pixel the rounded mean of a factor x factor box, rows and columns that fill
  no box dropped (fewer than the factor). No model input is larger, and a
  phone's 12-megapixel photo would otherwise be stored, read and resized at
  full size by every step (a 34 MB canonical PNG instead of 8.5 MB).

Subsample decodes every file once with `to_rgb` and stores the result
losslessly (`encode_canonical`, a PNG) in the split files, so tf.data decodes
those canonical bytes exactly (`decode_canonical`) and training and serving
see identical pixels. Every path then resizes with the one `resize`.

The published SavedModel also takes encoded bytes (`decode_in_graph`): that
graph does what TensorFlow ops can (formats, alpha, grayscale, 16-bit, first
frame) but not EXIF orientation, GIF transparency or a first frame smaller than
its screen, BMPs of palette, 16-bit or compressed pixels, or TIFF; a client
applies those first (README "Images", `client_bytes`).

DECODER_VERSION is recorded with features, models and predictions; it changes
whenever the decoded pixels may change (this module's rules, Pillow's version).
"""
from __future__ import annotations

import io
import re
import struct
import warnings
import zlib

import numpy as np
import PIL

from tasks.errors import ImageDecodeError

DECODER_VERSION = f"3+pillow{PIL.__version__}"
BACKGROUND: tuple[int, int, int] = (255, 255, 255)  # white: how viewers show transparency, and clip art's page
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
RESIZE_METHOD = "bilinear"
RESIZE_ANTIALIAS = True  # downscaling a photo without it aliases; upscaling (the demo) is unaffected
REDUCED_SIDE = 1024  # px: the largest image_size a run may ask for
CANONICAL_PNG_LEVEL = 1  # zlib level of the stored canonical PNGs: fast to write, decoding speed is the same

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
BIGTIFF_SIGNATURES = (b"II+\x00", b"MM\x00+")
TIFF_WIDTH, TIFF_LENGTH = 256, 257  # the first image directory's ImageWidth and ImageLength tags
TIFF_SHORT = 3
# ancillary chunks that change no decoder's pixels; not text: Pillow reads an EXIF or XMP orientation from text chunks
PLAIN_PNG_ANCILLARY = {b"pHYs", b"tIME"}
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
MAX_SIDE = 2**31 - 1
OBJECT_REPR = re.compile(r" ?<[^<>]* object at 0x[0-9a-fA-F]+>")  # Pillow names the BytesIO it read: no help to anyone
WEBP_ANIMATION_FLAG = 0x02  # in the VP8X chunk's flags byte
WEBP_ALPHA_FLAG = 0x10
WEBP_OPAQUE_ANIMATION = ("an animated WebP without alpha cannot be decoded by TensorFlow 2.21 (it corrupts memory); "
                         "send its first frame as PNG")
# TensorFlow's BMP decoder reads uncompressed 24- and 32-bit pixels after a header of at least BITMAPINFOHEADER's
# 40 bytes; it takes 8-bit pixels for gray (a palette's colours are lost) and refuses 1, 4 and 16 bits
BMP_GRAPH_BITS = (24, 32)
BMP_INFO_HEADER = 40
BMP_NOT_IN_GRAPH = ("a BMP of palette, 16-bit or compressed pixels, or with an OS/2 header, which TensorFlow 2.21 "
                    "decodes wrongly or not at all; send its pixels as PNG")
GIF_PARTIAL_FRAME = ("a GIF whose first frame does not cover its whole screen, which TensorFlow 2.21 decodes at the "
                     "frame's size, shifted; send its first frame as PNG")


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file header alone, parsed here; ImageDecodeError when it cannot be read."""
    _, width, height = _header(data)
    return width, height


def image_format(data: bytes) -> str:
    """The format its signature names ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"); ImageDecodeError otherwise."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in TIFF_SIGNATURES:
        return "TIFF"
    if data[4:8] == b"ftyp":  # ISO media: HEIC/HEIF (phones' default), AVIF
        brand = data[8:12].decode("ascii", "replace").strip()
        raise ImageDecodeError(f"a HEIF/AVIF image (brand {brand!r}, as phones save by default), which is not "
                               "accepted: export it as JPEG or PNG (on an iPhone: Settings > Camera > Formats > Most "
                               "Compatible)")
    if data[:4] in BIGTIFF_SIGNATURES:
        raise ImageDecodeError("a BigTIFF (a TIFF over 4 GB addressing), which is not accepted; save it as an "
                               "ordinary TIFF or a PNG")
    raise ImageDecodeError(f"not an accepted image: its first bytes {data[:8]!r} are none of the signatures of "
                           f"{', '.join(FORMATS)}; convert it to one of them")


def to_rgb(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB by the rules above; ImageDecodeError naming what is wrong.

    `max_pixels` (the deployment's TLP_MAX_IMAGE_PIXELS) is checked against the
    header before anything is decoded.
    """
    pixels = _decoded(data, max_pixels)
    return np.repeat(pixels[..., np.newaxis], 3, axis=-1) if pixels.ndim == 2 else pixels


def canonical_png(data: bytes, *, max_pixels: int | None = None) -> bytes:
    """`to_rgb`'s pixels as the lossless PNG the split files store (see `encode_canonical`).

    The file is always decoded (that validates it and applies every rule); a
    file that is already canonical (`is_plain_png`: an 8-bit gray or RGB PNG
    with nothing that changes its pixels) is then returned as it is, the same
    object, instead of being written again.
    """
    plain = is_plain_png(data)
    # a plain PNG has no chunk Pillow reads an orientation from (eXIf, text, XMP): it needs no EXIF transpose
    pixels = _decoded(data, max_pixels, orient=not plain)
    return data if plain and is_plain_png(data, pixels, structure_checked=True) else encode_canonical(pixels)


def is_plain_png(data: bytes, pixels: np.ndarray | None = None, *, structure_checked: bool = False) -> bool:
    """Whether `decode_canonical(data)` gives exactly `to_rgb(data)`'s pixels, so `data` may be stored as it is.

    True only for a PNG of 8-bit gray or RGB, not interlaced, too small to be
    reduced (REDUCED_SIDE), whose chunks are
    IHDR, consecutive IDATs, IEND and pHYs/tIME (no tRNS, eXIf, acTL, text
    that may hold an orientation, gamma or colour profile), every CRC right
    (Pillow skips the IDAT CRCs that libpng checks), nothing after IEND, and
    whose image data inflates to exactly its rows, each with a valid filter byte.
    `pixels` (what `_decoded` gave) must then have the declared size and
    channels (`structure_checked`: the chunks were checked by an earlier call).
    Anything else is re-encoded: the fast path never guesses.
    """
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        return False
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if depth != 8 or colour not in (0, 2) or compression or filtering or interlace:
        return False
    if min(width, height) >= 2 * REDUCED_SIDE:  # the decoder reduces it: not inflated here only to be re-encoded
        return False
    channels = 1 if colour == 0 else 3
    if pixels is not None and (pixels.dtype != np.uint8 or pixels.shape != ((height, width) if channels == 1
                                                                            else (height, width, 3))):
        return False
    if structure_checked:
        return True
    inflate = zlib.decompressobj()
    row = 1 + width * channels
    expected = row * height
    raw = []
    position, previous, size = 8, b"", 0
    while position + 12 <= len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        end = position + 12 + length
        kind = data[position + 4:position + 8]
        if end > len(data) or struct.unpack(">I", data[end - 4:end])[0] != zlib.crc32(data[position + 4:end - 4]):
            return False
        if kind == b"IEND":
            if end != len(data) or length or not inflate.eof or inflate.unused_data or size != expected:
                return False
            rows = np.frombuffer(b"".join(raw), np.uint8)
            return bool((rows[::row] <= 4).all())
        if kind == b"IDAT":
            if raw and previous != b"IDAT" or inflate.eof:
                return False
            chunk = inflate.decompress(data[position + 8:end - 4], expected - size + 1)
            if inflate.unconsumed_tail:
                return False  # more image data than rows
            raw.append(chunk)
            size += len(chunk)
            if size > expected:
                return False
        elif kind not in PLAIN_PNG_ANCILLARY and not (kind == b"IHDR" and position == 8):
            return False
        previous = kind
        position = end
    return False


def decode(data: bytes, image_size: int) -> np.ndarray:
    """Encoded bytes -> (image_size, image_size, 3) float32 in [0, 255]: `to_rgb`, then the model's `resize`."""
    return resize(to_rgb(data)[np.newaxis], image_size)[0].numpy()


def client_bytes(data: bytes) -> bytes:
    """What a client sends the bytes signature for an image file, so that it sees `to_rgb`'s pixels.

    The file itself, except where the graph cannot do what `to_rgb` does: an
    EXIF orientation other than 1, a GIF with a transparent colour, an animated
    WebP without alpha, a TIFF (TensorFlow has no TIFF decoder), a BMP that is
    not of uncompressed 24- or 32-bit pixels (BMP_NOT_IN_GRAPH), a GIF whose first
    frame does not cover its screen (GIF_PARTIAL_FRAME). Those are sent as
    `to_rgb`'s pixels in a PNG.
    """
    from PIL import ExifTags, Image

    kind = image_format(data)
    if kind == "TIFF" or kind == "BMP" and not _bmp_in_graph(data):
        return canonical_png(data)
    if kind == "WEBP" and data[12:16] == b"VP8X" and len(data) > 20:
        if data[20] & WEBP_ANIMATION_FLAG and not data[20] & WEBP_ALPHA_FLAG:
            return canonical_png(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # only the header is read here
            image = Image.open(io.BytesIO(data), formats=[kind])
        with image:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            gif_graph_cannot = kind == "GIF" and ("transparency" in image.info
                                                  or bool(image.tile) and image.tile[0][1] != (0, 0, *image.size))
    except Exception as error:  # noqa: BLE001 - the decoder names what is wrong
        raise ImageDecodeError(f"a {kind} whose header does not parse: {type(error).__name__}: {error}") from error
    return canonical_png(data) if orientation not in (None, 1) or gif_graph_cannot else data


def resize(images, image_size: int):
    """The one resize of every path: float32 [..., image_size, image_size, 3], values kept in [0, 255]."""
    import tensorflow as tf

    images = tf.image.resize(tf.cast(images, tf.float32), (image_size, image_size), method=RESIZE_METHOD,
                             antialias=RESIZE_ANTIALIAS)
    return tf.clip_by_value(images, 0.0, 255.0)


def encode_canonical(pixels: np.ndarray) -> bytes:
    """8-bit pixels ((H, W) gray or (H, W, 3) RGB) as a PNG that `decode_canonical` turns back into them.

    Gray when R = G = B (a third of the bytes, the same RGB once decoded). Written
    here rather than by Pillow: no filters, zlib level 1, about 4x faster to
    write than Pillow's encoder for small images, and decoded just as fast.
    """
    if pixels.ndim == 3 and _is_gray(pixels):
        pixels = pixels[..., 0]
    height, width = pixels.shape[:2]
    rows = np.zeros((height, 1 + pixels[0].size), np.uint8)  # a 0 (no filter) byte before each row
    rows[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    return b"".join((PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), CANONICAL_PNG_LEVEL)), _png_chunk(b"IEND", b"")))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def decode_canonical(encoded):
    """A canonical PNG (tensor) -> (H, W, 3) uint8 tensor: exactly the pixels `to_rgb` gave."""
    import tensorflow as tf

    return tf.io.decode_png(encoded, channels=3)


def decode_in_graph(encoded, image_size: int):
    """One encoded image (a scalar string tensor) -> (image_size, image_size, 3) float32, in TensorFlow ops.

    The bytes signature of the published model runs this. It matches `to_rgb`
    except where no TensorFlow op can: EXIF orientation is not applied, a GIF's
    transparent pixels come out black (TensorFlow's GIF decoder drops
    transparency), and an animated WebP without alpha, a BMP TensorFlow cannot
    read and a GIF whose first frame leaves part of its screen uncovered are
    refused (WEBP_OPAQUE_ANIMATION, BMP_NOT_IN_GRAPH, GIF_PARTIAL_FRAME).
    """
    import tensorflow as tf

    def jpeg():
        # the accurate integer DCT is what Pillow's libjpeg uses: the same pixels as to_rgb
        return _opaque(tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"))

    def png():
        # libpng expands gray, palette, tRNS and under 8 bits to 16 bits; the high byte is to_rgb's 8 bits
        def decoded(channels):
            image = tf.io.decode_png(encoded, channels=channels, dtype=tf.uint16)
            return tf.cast(tf.bitwise.right_shift(image, tf.constant(8, tf.uint16)), tf.uint8)

        def palette():
            # RGB, or RGBA when it has a tRNS chunk: asked for 4 channels, a palette of 1, 2 or 4 bits without one
            # gets the bit depth's maximum (1, 3 or 15) for alpha instead of opaque
            return _rgba(decoded(0), opaque_alpha=False)

        def expanded():
            image = decoded(4)
            # gray under 8 bits has the same fault; its tRNS makes alpha 0 or 255 only, so anything else is opaque
            alpha = tf.where(tf.logical_or(_number(encoded, 24, tf.uint8) >= 8, image[..., 3:] == 0), image[..., 3:],
                             tf.constant(255, tf.uint8))
            return tf.concat([image[..., :3], alpha], axis=-1)

        return tf.cond(_number(encoded, 25, tf.uint8) == 3, palette, expanded)  # IHDR colour type 3: palette

    def webp():
        # TF 2.21 decodes an animation only as RGBA, refuses RGBA for one without the alpha flag, and on the default
        # channels writes its RGBA frames into an RGB buffer (heap corruption): such a file is refused before decoding
        flags = _number(encoded, 20, tf.uint8)
        extended = tf.strings.substr(encoded, 12, 4) == b"VP8X"
        animated = tf.logical_and(extended, tf.not_equal(tf.bitwise.bitwise_and(flags, WEBP_ANIMATION_FLAG), 0))
        with_alpha = tf.not_equal(tf.bitwise.bitwise_and(flags, WEBP_ALPHA_FLAG), 0)

        def animation():
            check = tf.debugging.Assert(with_alpha, [WEBP_OPAQUE_ANIMATION])
            with tf.control_dependencies([check]):
                return tf.io.decode_webp(tf.identity(encoded), channels=4)[0]

        return tf.cond(animated, animation, lambda: _rgba(tf.io.decode_webp(encoded)[0], opaque_alpha=False))

    def bmp():
        with tf.control_dependencies([tf.debugging.Assert(_bmp_in_graph_tf(encoded), [BMP_NOT_IN_GRAPH])]):
            # a BMP's fourth byte is padding in most files: opaque, as to_rgb has it
            return _rgba(tf.io.decode_bmp(tf.identity(encoded), channels=0), opaque_alpha=True)

    def gif():
        # anything else fails here, named by decode_image; a GIF's first frame that does not cover the screen comes
        # out at its own size, its pixels shifted
        image = tf.io.decode_image(encoded, channels=0, expand_animations=False)
        screen = tf.cast(tf.stack([_number(encoded, 8, tf.uint16), _number(encoded, 6, tf.uint16)]), tf.int32)
        covers = tf.reduce_all(tf.equal(tf.shape(image)[:2], screen))  # (height, width) of the header's screen
        with tf.control_dependencies([tf.debugging.Assert(covers, [GIF_PARTIAL_FRAME])]):
            return _rgba(tf.identity(image), opaque_alpha=False)

    start = tf.strings.substr(encoded, 0, 12)
    rgba = tf.case([(tf.strings.substr(start, 0, 3) == b"\xff\xd8\xff", jpeg),
                    (tf.strings.substr(start, 0, 8) == PNG_SIGNATURE, png),
                    (tf.logical_and(tf.strings.substr(start, 0, 4) == b"RIFF",
                                    tf.strings.substr(start, 8, 4) == b"WEBP"), webp),
                    (tf.strings.substr(start, 0, 2) == b"BM", bmp)],
                   default=gif, exclusive=True)
    rgba.set_shape((None, None, 4))
    return resize(_reduced_tf(_composite_tf(rgba)), image_size)


def _bmp_in_graph(data: bytes) -> bool:
    """Whether TensorFlow's BMP decoder reads this BMP's pixels as to_rgb does (BMP_GRAPH_BITS)."""
    if len(data) < 34:
        return False
    header, = struct.unpack("<I", data[14:18])
    bits, compression = struct.unpack("<HI", data[28:34])
    return header >= BMP_INFO_HEADER and bits in BMP_GRAPH_BITS and compression == 0


def _bmp_in_graph_tf(encoded):
    """`_bmp_in_graph` in TensorFlow ops, for the bytes signature."""
    import tensorflow as tf

    def readable():
        header, bits = _number(encoded, 14, tf.int32), tf.cast(_number(encoded, 28, tf.uint16), tf.int32)
        compression = _number(encoded, 30, tf.int32)
        return tf.logical_and(tf.logical_and(header >= BMP_INFO_HEADER, compression == 0),
                              tf.reduce_any(tf.equal(bits, BMP_GRAPH_BITS)))

    return tf.cond(tf.strings.length(encoded) >= 34, readable, lambda: tf.constant(False))


def _number(encoded, position: int, dtype):
    """The little-endian number of `dtype` that starts at byte `position` of a string tensor, as a scalar."""
    import tensorflow as tf

    return tf.io.decode_raw(tf.strings.substr(encoded, position, dtype.size), dtype, little_endian=True)[0]


def _rgba(image, opaque_alpha):
    """A decoded uint8 image of 1-4 channels -> RGBA (a fourth channel is alpha unless `opaque_alpha`)."""
    import tensorflow as tf

    channels = tf.shape(image)[-1]
    gray = tf.repeat(image[..., :1], 3, axis=-1)
    return tf.case([(tf.equal(channels, 1), lambda: _opaque(gray)),
                    (tf.equal(channels, 2), lambda: tf.concat([gray, image[..., 1:2]], axis=-1)),
                    (tf.logical_or(tf.equal(channels, 3), opaque_alpha), lambda: _opaque(image[..., :3]))],
                   default=lambda: image[..., :4], exclusive=False)


def _opaque(rgb):
    import tensorflow as tf

    return tf.concat([rgb, tf.fill(tf.concat([tf.shape(rgb)[:-1], [1]], axis=0), tf.constant(255, tf.uint8))],
                     axis=-1)


def _composite_tf(rgba):
    """The in-graph twin of `_composite`: the same integer rounding, so the same bytes."""
    import tensorflow as tf

    rgb = tf.cast(rgba[..., :3], tf.int32)
    alpha = tf.cast(rgba[..., 3:], tf.int32)
    background = tf.constant(BACKGROUND, tf.int32)
    return tf.cast((rgb * alpha + background * (255 - alpha) + 127) // 255, tf.uint8)


def _composite(rgba: np.ndarray) -> np.ndarray:
    """RGBA uint8 onto BACKGROUND, rounded to the nearest 8-bit value."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    background = np.asarray(BACKGROUND, np.uint32)
    return ((rgb * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)


def _decoded(data: bytes, max_pixels: int | None, *, orient: bool = True) -> np.ndarray:
    """Encoded bytes -> (H, W) gray or (H, W, 3) RGB uint8 by the module's rules.

    `orient=False` skips the EXIF transpose, for a file known to hold no orientation (`is_plain_png`).
    """
    from PIL import Image, ImageOps

    kind, width, height = _header(data)
    _check_pixels(kind, width, height, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[kind]) as image:
                _check_pixels(kind, *image.size, max_pixels)  # what the library will decode, also limited
                image.seek(0)
                image.load()
                _key_out_rgb16(data, kind, image)
                if orient:  # in place: otherwise Pillow copies every image that needs no turn (a photo's megapixels)
                    ImageOps.exif_transpose(image, in_place=True)
                return _reduced(_pixels(image, kind))
    except ImageDecodeError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        reason = OBJECT_REPR.sub("", f"{type(error).__name__}: {error}")
        raise ImageDecodeError(f"a {kind} whose data does not decode ({reason}): it is cut short, damaged or of a kind "
                               "Pillow does not read (a floating-point RGB TIFF, say); open it and save it again as "
                               "PNG or JPEG, or leave it out") from error


def _key_out_rgb16(data: bytes, kind: str, image) -> None:
    """Give a 16-bit RGB PNG with a transparent colour (tRNS) its alpha, in place.

    Pillow loads such a file as 8-bit RGB and compares the 16-bit colour with
    8-bit pixels, which never match; libpng (through TensorFlow, as the bytes
    signature decodes it) reads the 16-bit samples the colour is compared with.
    """
    from PIL import Image

    if kind != "PNG" or data[24:26] != b"\x10\x02" or image.mode != "RGB" or "transparency" not in image.info:
        return
    import tensorflow as tf

    samples = tf.io.decode_png(data, channels=3, dtype=tf.uint16).numpy()
    transparent = (samples == np.asarray(image.info["transparency"], np.uint16)).all(axis=-1)
    image.putalpha(Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8)))


def _pixels(image, kind: str) -> np.ndarray:
    """A loaded Pillow image of any mode -> (H, W) gray or (H, W, 3) RGB uint8."""
    mode = image.mode
    transparent = "transparency" in image.info and kind != "BMP"
    if mode == "F":  # floating point (TIFF): [0, 1] is the usual range, anything else is taken as [0, 255]
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 1.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        if transparent and isinstance(image.info["transparency"], int):
            alpha = np.where(values == image.info["transparency"], 0, 255).astype(np.uint8)
            return _composite(np.stack([gray, gray, gray, alpha], axis=-1))
        return gray
    if kind != "BMP" and (transparent or mode in ("RGBA", "LA", "La", "PA", "RGBa")):
        return _composite(np.asarray(image.convert("RGBA")))
    if mode in ("L", "1"):
        return np.asarray(image if mode == "L" else image.convert("L"))
    return np.asarray(image if mode == "RGB" else image.convert("RGB"))


def _reduced(pixels: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) uint8 reduced by REDUCED_SIDE's rule: the rounded mean of each factor x factor box."""
    factor = min(pixels.shape[:2]) // REDUCED_SIDE
    if factor < 2:
        return pixels
    height, width = pixels.shape[0] // factor, pixels.shape[1] // factor
    area = factor * factor
    sums = np.full((height, width, *pixels.shape[2:]), area // 2, np.uint32)  # + half the area: rounded
    for row in range(factor):  # a strided slice per box position: 4x faster than summing a reshaped view
        for column in range(factor):
            sums += pixels[row:height * factor:factor, column:width * factor:factor]
    return (sums // area).astype(np.uint8)


def _reduced_tf(rgb):
    """`_reduced` in TensorFlow ops, on (H, W, 3) uint8: the same integer arithmetic, so the same bytes."""
    import tensorflow as tf

    shape = tf.shape(rgb)
    factor = tf.minimum(shape[0], shape[1]) // REDUCED_SIDE

    def reduce():
        height, width = shape[0] // factor, shape[1] // factor
        boxes = tf.reshape(tf.cast(rgb[:height * factor, :width * factor], tf.int32),
                           [height, factor, width, factor, 3])
        area = factor * factor
        return tf.cast((tf.reduce_sum(boxes, axis=[1, 3]) + area // 2) // area, tf.uint8)

    return tf.cond(factor >= 2, reduce, lambda: rgb)


def _is_gray(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


def _check_pixels(kind: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(f"a {kind} of {width}x{height} = {width * height:,} pixels, above the limit of "
                               f"{max_pixels:,} pixels; not decoded")


def _header(data: bytes) -> tuple[str, int, int]:
    kind = image_format(data)
    try:
        width, height = _PARSERS[kind](data)
    except (struct.error, IndexError) as error:
        raise ImageDecodeError(f"a {kind} whose header is cut short ({len(data)} bytes)") from error
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise ImageDecodeError(f"a {kind} whose header declares {width}x{height} pixels")
    return kind, width, height


def _png_size(data: bytes) -> tuple[int, int]:
    length, chunk = struct.unpack(">I4s", data[8:16])
    if chunk != b"IHDR" or length != 13:
        raise ImageDecodeError(f"a PNG whose first chunk is {chunk!r} of {length} bytes, not a 13-byte IHDR")
    body = data[12:29]
    if len(body) < 17 or struct.unpack(">I", data[29:33])[0] != zlib.crc32(body):
        raise ImageDecodeError("a PNG whose IHDR header is damaged (its CRC does not match)")
    return struct.unpack(">II", data[16:24])


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while True:
        while data[position] != 0xFF:  # bytes between segments are tolerated, as decoders do
            position += 1
        while data[position] == 0xFF:  # fill bytes
            position += 1
        marker = data[position]
        position += 1
        if marker in JPEG_STANDALONE or marker == 0xD8:
            continue
        if marker in (0xD9, 0xDA):
            raise ImageDecodeError("a JPEG with no frame header (SOFn) before its image data")
        (length,) = struct.unpack(">H", data[position:position + 2])
        if marker in JPEG_SOF:
            height, width = struct.unpack(">HH", data[position + 3:position + 7])
            return width, height
        if length < 2:
            raise ImageDecodeError(f"a JPEG with a broken segment length ({length}) at byte {position}")
        position += length


def _gif_size(data: bytes) -> tuple[int, int]:
    return struct.unpack("<HH", data[6:10])


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:
        return struct.unpack("<HH", data[18:22])
    if header < 16:
        raise ImageDecodeError(f"a BMP with an unknown header of {header} bytes")
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # negative height: rows stored top-down


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageDecodeError("a WebP whose VP8 frame has no start code")
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ImageDecodeError("a WebP whose VP8L stream has no signature")
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        if len(data) < 30:
            raise IndexError(30)
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ImageDecodeError(f"a WebP whose first chunk is {chunk!r}, not VP8, VP8L or VP8X")


def _tiff_size(data: bytes) -> tuple[int, int]:
    """ImageWidth and ImageLength of the first image file directory (the page the decoder reads)."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[offset:offset + 2])
    found = {}
    for entry in range(offset + 2, offset + 2 + 12 * count, 12):
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (TIFF_WIDTH, TIFF_LENGTH):
            value = data[entry + 8:entry + 12]
            found[tag] = struct.unpack(order + ("H" if kind == TIFF_SHORT else "I"),
                                       value[:2] if kind == TIFF_SHORT else value)[0]
    if len(found) < 2:
        raise ImageDecodeError("a TIFF whose first image directory declares no width or height")
    return found[TIFF_WIDTH], found[TIFF_LENGTH]


_PARSERS = {"PNG": _png_size, "JPEG": _jpeg_size, "GIF": _gif_size, "BMP": _bmp_size, "WEBP": _webp_size,
            "TIFF": _tiff_size}
