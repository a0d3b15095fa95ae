"""The one decoder: each case a real dataset holds, pinned with a crafted file; train and serve see the same pixels."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tasks import images
from tasks.errors import ImageDecodeError, PermanentError
from tests.helpers import images as fx

SIZE = 24


def test_exif_orientation_is_applied():
    rgb = images.to_rgb(fx.exif_rotated_jpeg())
    assert rgb.shape == (40, 20, 3), "stored 40 wide x 20 high, displayed 20 wide x 40 high"
    top, bottom = rgb[5, 10].astype(int), rgb[-5, 10].astype(int)
    assert top[0] > 200 and top[2] < 60, "the stored left (red) half is on top after a clockwise turn"
    assert bottom[2] > 200 and bottom[0] < 60


def test_cmyk_jpeg_becomes_rgb():
    rgb = images.to_rgb(fx.cmyk_jpeg())
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_allclose(rgb[8, 8], (0, 255, 255), atol=3)  # cyan ink


@pytest.mark.parametrize("case", [fx.gray16_png, fx.rgb16_png])
def test_16_bit_pngs_keep_their_high_byte(case):
    data, values = case()
    expected = (values >> 8).astype(np.uint8)
    if expected.ndim == 2:
        expected = np.repeat(expected[..., np.newaxis], 3, axis=-1)
    np.testing.assert_array_equal(images.to_rgb(data), expected)


def test_16_bit_rgba_png_is_composited_from_its_high_bytes():
    data, values = fx.rgba16_png()
    high = (values >> 8).astype(np.uint8)
    np.testing.assert_array_equal(images.to_rgb(data), fx.composite(high[..., :3], high[..., 3]))
    assert (images.to_rgb(data)[0] == images.BACKGROUND).all()


def test_a_16_bit_transparent_colour_is_matched_on_all_16_bits():
    """Pillow reads 16-bit RGB as its high bytes and never matched the 16-bit tRNS colour; libpng does."""
    data, values = fx.rgb16_png_with_transparent_colour()
    pixels = images.to_rgb(data)
    assert (pixels[0] == images.BACKGROUND).all()
    np.testing.assert_array_equal(pixels[1:], (values[1:] >> 8).astype(np.uint8))  # row 1: same high bytes, opaque


def test_palette_transparent_index_shows_the_background():
    rgb = images.to_rgb(fx.palette_png_with_transparent_index())
    assert tuple(rgb[0, 0]) == fx.RED and tuple(rgb[0, 1]) == images.BACKGROUND


def test_grayscale_with_alpha_is_composited_with_rounding():
    data, gray, alpha = fx.la_png()
    rgb = images.to_rgb(data)
    np.testing.assert_array_equal(rgb, fx.composite(np.repeat(gray[..., np.newaxis], 3, axis=-1), alpha))
    assert tuple(rgb[0, 0]) == images.BACKGROUND and tuple(rgb[0, -1]) == (100, 100, 100)


def test_colours_under_full_transparency_never_reach_the_pixels():
    (first, pixels), (second, _) = (fx.rgba_png_with_garbage_under_transparency(seed) for seed in (1, 2))
    assert first != second
    np.testing.assert_array_equal(images.to_rgb(first), images.to_rgb(second))
    assert (images.to_rgb(first)[:5] == images.BACKGROUND).all()
    np.testing.assert_array_equal(images.to_rgb(first)[5:], pixels[5:, :, :3])


def test_tiffs_of_every_kind_decode_like_their_pixels():
    """Scans and print exports: compressed RGB, CMYK, alpha (composited), 16-bit in either byte order, floats in
    [0, 1], several pages (the first)."""
    files = fx.crafted_files()
    np.testing.assert_array_equal(images.to_rgb(files["scan.tif"]), fx.noise(11, 13))
    np.testing.assert_array_equal(images.to_rgb(files["cmyk.tif"]), images.to_rgb(fx.encoded(
        Image.fromarray(fx.noise(6, 8, 4), mode="CMYK").convert("RGB"), "PNG")))
    _, rgba = fx.rgba_png_with_garbage_under_transparency(2)
    np.testing.assert_array_equal(images.to_rgb(files["rgba.tif"]), fx.composite(rgba[..., :3], rgba[..., 3]))
    _, gray16 = fx.gray16_png()
    np.testing.assert_array_equal(images.to_rgb(files["gray16_be.tif"])[..., 0], (gray16 >> 8).astype(np.uint8))
    data, expected = fx.float_tiff()
    np.testing.assert_array_equal(images.to_rgb(data)[..., 1], expected)
    assert tuple(images.to_rgb(files["pages.tif"])[0, 0]) == fx.RED


def test_bigtiff_is_refused_with_what_to_do():
    with pytest.raises(ImageDecodeError, match="BigTIFF.*save it as an ordinary TIFF or a PNG"):
        images.to_rgb(b"II+\x00" + b"\x00" * 12)


@pytest.mark.parametrize("format", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(format):
    rgb = images.to_rgb(fx.animation(format))
    assert rgb.shape == (8, 10, 3) and (rgb == fx.RED).all()


@pytest.mark.parametrize("format,options", [("BMP", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_lossless_formats_round_trip_exactly(format, options):
    pixels = fx.noise(7, 9)
    np.testing.assert_array_equal(images.to_rgb(fx.encoded(Image.fromarray(pixels), format, **options)), pixels)


def test_lossy_webp_and_jpeg_decode_close_to_their_source():
    pixels = np.full((16, 16, 3), (200, 40, 90), np.uint8)
    for format in ("WEBP", "JPEG"):
        np.testing.assert_allclose(images.to_rgb(fx.encoded(Image.fromarray(pixels), format, quality=90)), pixels,
                                   atol=6)


def test_grayscale_is_repeated_into_three_channels():
    gray = fx.noise(9, 11)[..., 0]
    np.testing.assert_array_equal(images.to_rgb(fx.encoded(Image.fromarray(gray), "PNG")),
                                  np.repeat(gray[..., np.newaxis], 3, axis=-1))


def test_bmp_fourth_byte_is_not_alpha():
    pixels = fx.noise(5, 6, 4)
    pixels[..., 3] = 0
    np.testing.assert_array_equal(images.to_rgb(fx.encoded(Image.fromarray(pixels), "BMP")), pixels[..., :3])


@pytest.mark.parametrize("name", sorted(fx.crafted_files()))
def test_header_size_is_what_the_decoder_finds(name):
    data = fx.crafted_files()[name]
    height, width, _ = images.to_rgb(data).shape
    size = images.header_size(data)
    factor = max(1, min(size) // images.REDUCED_SIDE)  # a large image is reduced after decoding
    upright = (height, width) if name == "exif_rotated.jpg" else (width, height)
    assert (size[0] // factor, size[1] // factor) == upright


@pytest.mark.parametrize("options", [
    {}, {"lossless": True}, {"save_all": True, "append_images": [Image.new("RGB", (300, 170))]},
], ids=["VP8", "VP8L", "VP8X"])
def test_header_size_reads_every_webp_kind(options):
    data = fx.encoded(Image.new("RGB", (300, 170)), "WEBP", **options)
    assert images.header_size(data) == (300, 170)


def test_jpeg_header_is_found_past_large_metadata_segments():
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: a 60 kB APP1 segment before the frame header
    data = fx.encoded(Image.new("RGB", (33, 21)), "JPEG", exif=exif.tobytes())
    assert images.header_size(data) == (33, 21)


@pytest.mark.parametrize("data,reason", [
    (b"", "none of the signatures of JPEG, PNG, GIF, BMP, WEBP, TIFF"),
    (b"MM\x00*\x00\x00\x00\x08\x00\x01" + b"\x01\x03" + b"\x00" * 10, "TIFF whose first image directory declares no"),
    (b"II*\x00\xff\xff\x00\x00", "a TIFF whose header is cut short"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIF/AVIF image \\(brand 'heic'.*export it as JPEG or PNG"),
    (b"%PDF-1.7 not an image", "none of the signatures"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "header is cut short"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 10 + b"\xff\xda", "no frame header"),
    (b"GIF89a\x00\x00\x05\x00", "declares 0x5 pixels"),
])
def test_unreadable_headers_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        images.header_size(data)


def test_damaged_ihdr_is_an_unreadable_header():
    data = bytearray(fx.encoded(Image.new("RGB", (4, 4)), "PNG"))
    data[18] ^= 1
    with pytest.raises(ImageDecodeError, match="IHDR header is damaged"):
        images.header_size(bytes(data))


def test_pixel_limit_holds_before_decoding_even_where_pillow_would_refuse_the_file(monkeypatch):
    bomb = fx.raw_png(np.zeros((1, 1), np.uint8), 0)
    bomb = bomb[:16] + struct.pack(">II", 60_000, 60_000) + bomb[24:]
    bomb = bomb[:29] + struct.pack(">I", zlib.crc32(bomb[12:29])) + bomb[33:]
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: pytest.fail("decoded a file above the limit"))
    with pytest.raises(ImageDecodeError, match=r"60000x60000 = 3,600,000,000 pixels, above the limit of 1,000,000"):
        images.to_rgb(bomb, max_pixels=1_000_000)


def test_truncated_and_corrupt_data_is_an_image_decode_error_naming_the_format():
    whole = fx.encoded(Image.fromarray(fx.noise(64, 64)), "PNG")
    with pytest.raises(ImageDecodeError, match="a PNG whose data does not decode") as error:
        images.to_rgb(whole[:len(whole) // 2])
    assert isinstance(error.value, PermanentError)
    assert "save it again as PNG or JPEG" in str(error.value)


def test_a_tiff_pillow_cannot_read_is_refused_with_what_to_do_and_no_object_address():
    directory = struct.pack("<H", 2) + struct.pack("<HHII", 256, 3, 1, 5) + struct.pack("<HHII", 257, 3, 1, 4)
    tiff = b"II*\x00" + struct.pack("<I", 8) + directory + b"\x00" * 4  # a size, and nothing Pillow can decode
    assert images.header_size(tiff) == (5, 4)
    with pytest.raises(ImageDecodeError, match="a TIFF whose data does not decode .*save it again") as error:
        images.to_rgb(tiff)
    assert "object at 0x" not in str(error.value)


def test_the_decoder_version_names_the_pillow_that_decodes():
    import PIL

    assert images.DECODER_VERSION.endswith(PIL.__version__)


def test_training_path_and_serving_path_give_identical_pixels(tmp_path):
    """Split records (subsample -> tf.data, as train and evaluate read them) against `decode` (scoring a new file)."""
    from tasks import records

    files = fx.crafted_files()
    path = tmp_path / "split.tfrecord"
    records.write_records(path, [(data, index, name) for index, (name, data) in enumerate(files.items())])
    seen = 0
    for batch, _, names in records.image_dataset(path, SIZE, 4, with_paths=True):
        for pixels, name in zip(batch.numpy(), names.numpy(), strict=False):
            np.testing.assert_array_equal(pixels, images.decode(files[name.decode()], SIZE), err_msg=name.decode())
            seen += 1
    assert seen == len(files)


def test_in_graph_decoder_matches_for_what_a_client_sends():
    """The bytes signature's decoder against `decode`, for every case, on the bytes `client_bytes` says to send."""
    import tensorflow as tf

    for name, data in fx.crafted_files().items():
        graph = images.decode_in_graph(tf.constant(images.client_bytes(data)), SIZE).numpy()
        np.testing.assert_array_equal(graph, images.decode(data, SIZE), err_msg=name)


@pytest.mark.parametrize("name", ["exif_rotated.jpg", "transparent.gif", "animated.webp", "scan.tif", "palette.bmp",
                                  "palette4.bmp", "bilevel.bmp", "rgb555.bmp", "partial_frame.gif",
                                  "small_first_frame.gif"])
def test_clients_decode_what_the_graph_cannot_and_send_the_rest_as_is(name):
    data = fx.crafted_files()[name]
    sent = images.client_bytes(data)
    assert sent != data and sent.startswith(b"\x89PNG")
    np.testing.assert_array_equal(images.to_rgb(sent), images.to_rgb(data))
    photo = fx.crafted_files()["photo.jpg"]
    assert images.client_bytes(photo) is photo


@pytest.mark.parametrize("name", ["gray1.png", "gray4.png", "palette2.png", "palette4.png"])
def test_in_graph_decoder_reads_pngs_under_8_bits_as_opaque(name):
    """libpng, asked for RGBA, gives these alpha 1, 3 or 15 (their bit depth's maximum): the graph must not."""
    import tensorflow as tf

    data = fx.crafted_files()[name]
    assert images.client_bytes(data) is data
    np.testing.assert_array_equal(images.decode_in_graph(tf.constant(data), SIZE).numpy(), images.decode(data, SIZE))


@pytest.mark.parametrize(("name", "reason"), [("animated.webp", "animated WebP without alpha"),
                                              ("palette.bmp", "BMP of palette"), ("palette4.bmp", "BMP of palette"),
                                              ("bilevel.bmp", "BMP of palette"), ("rgb555.bmp", "16-bit"),
                                              ("partial_frame.gif", "first frame does not cover"),
                                              ("small_first_frame.gif", "first frame does not cover")])
def test_in_graph_decoder_refuses_what_it_would_decode_wrongly_instead_of_guessing(name, reason):
    """Sent as they are (not as `client_bytes` makes them), these would crash or come out with other pixels."""
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match=reason):
        images.decode_in_graph(tf.constant(fx.crafted_files()[name]), SIZE)


@pytest.mark.parametrize(("height", "width", "factor"), [(2048, 2053, 2), (3100, 3073, 3), (2047, 2100, 1)])
def test_images_twice_the_largest_input_are_reduced_by_box_means(height, width, factor):
    """The shorter side's whole multiple of REDUCED_SIDE is the factor; the rows and columns that fill no box go."""
    pixels = fx.large_picture(height, width)
    decoded = images.to_rgb(fx.encoded(Image.fromarray(pixels), "PNG", compress_level=1))
    kept = pixels[:height // factor * factor, :width // factor * factor].astype(np.float64)
    means = kept.reshape(height // factor, factor, width // factor, factor, 3).mean(axis=(1, 3))
    np.testing.assert_array_equal(decoded, np.floor(means + 0.5).astype(np.uint8))
    assert min(decoded.shape[:2]) >= images.REDUCED_SIDE


def test_a_large_photo_is_turned_upright_before_it_is_reduced():
    exif = Image.Exif()
    exif[fx.EXIF_ORIENTATION] = fx.ROTATE_90_CW
    stored = fx.large_picture(2048, 3000)  # landscape as stored; upright it is 3000 high
    decoded = images.to_rgb(fx.encoded(Image.fromarray(stored), "PNG", exif=exif.tobytes(), compress_level=1))
    assert decoded.shape == (1500, 1024, 3)


def test_resize_averages_when_shrinking_instead_of_sampling():
    """A photo shrunk 8x: each output pixel averages its 8x8 block (sampling two pixels would alias)."""
    pixels = fx.noise(64, 64)
    shrunk = images.resize(pixels[np.newaxis], 8)[0].numpy()
    blocks = pixels.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))
    assert np.abs(shrunk - blocks)[1:-1, 1:-1].mean() < 10 < np.abs(pixels[::8, ::8] - blocks).mean()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _split_idat(data: bytes) -> bytes:
    """The same PNG with its image data in two IDAT chunks (as encoders write large images)."""
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    body = data[start + 8:start + 8 + length]
    return data[:start] + _chunk(b"IDAT", body[:5]) + _chunk(b"IDAT", body[5:]) + data[start + 12 + length:]


def _with_chunk(data: bytes, chunk: bytes) -> bytes:
    """`chunk` inserted right after the IHDR."""
    return data[:33] + chunk + data[33:]


def _damaged_idat_crc(data: bytes) -> bytes:
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    end = start + 12 + length
    return data[:end - 4] + bytes(b ^ 0xFF for b in data[end - 4:end]) + data[end:]


@pytest.mark.parametrize("data", [fx.encoded(Image.fromarray(fx.noise(9, 7)[..., 0]), "PNG"),
                                  fx.encoded(Image.fromarray(fx.noise(9, 7)), "PNG"),
                                  fx.encoded(Image.fromarray(fx.noise(9, 7)), "PNG", dpi=(72, 72)),
                                  fx.raw_png(fx.noise(5, 6), 2),
                                  _split_idat(fx.raw_png(fx.noise(5, 6), 2))],
                         ids=["gray", "rgb", "rgb-phys", "hand-written", "two-idat"])
def test_an_already_canonical_png_is_stored_as_it_is_and_decodes_to_the_same_pixels(data):
    assert images.is_plain_png(data)
    assert images.canonical_png(data) is data
    np.testing.assert_array_equal(images.decode_canonical(data).numpy(), images.to_rgb(data))


@pytest.mark.parametrize("make", [
    lambda d: _with_chunk(d, _chunk(b"tRNS", b"\x00\x01\x00\x02\x00\x03")),
    lambda d: _with_chunk(d, _chunk(b"eXIf", b"MM\x00*\x00\x00\x00\x08" + bytes(6))),
    lambda d: _with_chunk(d, _chunk(b"tEXt", b"Raw profile type exif\x00x")),
    lambda d: _with_chunk(d, _chunk(b"gAMA", struct.pack(">I", 100000))),
    lambda d: d + b"trailing",
    lambda d: _damaged_idat_crc(d),
    lambda d: d[:33] + _chunk(b"IDAT", zlib.compress(b"\x00" * 2000)) + _chunk(b"IEND", b""),  # too much data
    lambda d: d[:33] + _chunk(b"IDAT", zlib.compress(b"\x05" + b"\x00" * 89)) + _chunk(b"IEND", b""),  # bad filter
    lambda d: fx.raw_png(fx.noise(5, 6).astype(np.uint16) * 257, 2),
    lambda d: fx.encoded(Image.fromarray(fx.noise(5, 6)[..., 0]).convert("P"), "PNG"),
    lambda d: d[:8] + _chunk(b"IHDR", d[16:28] + b"\x01") + d[33:],  # interlaced
    lambda d: fx.encoded(Image.fromarray(fx.noise(9, 7)), "BMP"),
], ids=["trns", "exif", "text", "gamma", "trailing", "idat-crc", "too-much-data", "bad-filter", "16-bit", "palette",
        "interlaced", "bmp"])
def test_anything_but_a_plain_png_is_written_anew_with_the_same_pixels(make):
    data = make(fx.raw_png(fx.noise(5, 6), 2))
    assert not images.is_plain_png(data)
    try:
        pixels = images.to_rgb(data)
    except ImageDecodeError:
        return  # refused by the decoder: subsample skips and lists it
    canonical = images.canonical_png(data)
    assert canonical != data
    np.testing.assert_array_equal(images.decode_canonical(canonical).numpy(), pixels)


def test_the_fast_path_checks_the_pixels_it_decoded():
    data = fx.raw_png(fx.noise(5, 6), 2)
    assert images.is_plain_png(data, images.to_rgb(data))
    assert not images.is_plain_png(data, images.to_rgb(data)[:4])
    assert not images.is_plain_png(data, images.to_rgb(data)[..., 0])
