"""Decoding rules, one test (or more) per rule, on files made with PIL; pixel values are asserted."""

import io
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from dedup_assets.ingest.decode import DecodeError, DecodeLimits, ProbeResult, decode_rgb, probe
from dedup_assets.synth.hostile import (
    _gradient,
    bomb_png,
    exif_rotated_jpeg,
    hostile_files,
    real_bomb_png,
)

H = hostile_files()
REASONS = {
    "ok", "empty_file", "not_an_image", "unsupported", "truncated", "corrupt",
    "decompression_bomb", "too_small", "too_large",
}


def _enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


# ------------------------------------------------------------------------------------- statuses
EXPECTED_STATUS = {
    "empty.jpg": "empty_file",
    "truncated.jpg": "truncated",
    "text_named.jpg": "not_an_image",
    "bomb.png": "decompression_bomb",
    "tiny.png": "too_small",
    **{name: "ok" for name in [
        "cmyk.jpg", "gray16.png", "palette_transparent.png", "gray_alpha.png", "rgba.png",
        "animated.gif", "exif_rotated.jpg", "corrupt_exif.jpg", "one_bit.bmp", "image.tiff",
        "image.webp", "gray32.tif", "float32.tif", "palette_alpha.tif",
    ]},
}


def test_every_hostile_file_has_an_expected_status() -> None:
    assert set(H) == set(EXPECTED_STATUS)


@pytest.mark.parametrize("name", sorted(EXPECTED_STATUS))
def test_probe_status_and_decode_agree(name: str) -> None:
    res = probe(H[name])
    assert res.status == EXPECTED_STATUS[name], res
    assert (res.error is None) == (res.status == "ok")
    if res.status == "ok":
        img = decode_rgb(H[name])
        assert img.mode == "RGB" and img.size == (res.width, res.height)
    else:
        with pytest.raises(DecodeError) as e:
            decode_rgb(H[name])
        assert e.value.reason == res.status


def test_probe_reports_format_and_stored_mode() -> None:
    modes = {n: (probe(H[n]).format, probe(H[n]).mode) for n in
             ["cmyk.jpg", "gray16.png", "palette_transparent.png", "gray_alpha.png", "animated.gif",
              "one_bit.bmp", "gray32.tif", "float32.tif", "palette_alpha.tif", "image.webp"]}
    assert modes == {
        "cmyk.jpg": ("JPEG", "CMYK"), "gray16.png": ("PNG", "I;16"), "palette_transparent.png": ("PNG", "P"),
        "gray_alpha.png": ("PNG", "LA"), "animated.gif": ("GIF", "P"), "one_bit.bmp": ("BMP", "1"),
        "gray32.tif": ("TIFF", "I"), "float32.tif": ("TIFF", "F"), "palette_alpha.tif": ("TIFF", "PA"),
        "image.webp": ("WEBP", "RGB"),
    }


# ------------------------------------------------------------------------ truncated and broken
def test_cut_and_damaged_files_give_a_reason_never_an_exception() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    rng = np.random.default_rng(0)
    for name, data in H.items():
        variants = [data[: int(len(data) * f)] for f in (0.05, 0.3, 0.6, 0.9, 0.99) if data]
        for _ in range(3):  # a few flipped bytes in the middle
            b = bytearray(data)
            for pos in rng.integers(len(b) // 4, max(len(b) // 4 + 1, len(b)), size=min(len(b), 4)):
                b[pos] ^= 0xFF
            variants.append(bytes(b))
        for v in variants:
            res = probe(v)
            assert isinstance(res, ProbeResult) and res.status in REASONS, (name, res)
            try:
                decode_rgb(v)
            except DecodeError as e:
                assert e.reason in REASONS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on as a side effect


def test_truncation_is_caught_in_every_format() -> None:
    noise = Image.fromarray((np.random.default_rng(1).random((120, 160, 3)) * 255).astype(np.uint8))
    for fmt in ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]:
        data = _enc(noise, fmt)
        for cut in (len(data) // 2, len(data) - 3):
            assert probe(data[:cut]).status == "truncated", (fmt, cut)
            with pytest.raises(DecodeError) as e:
                decode_rgb(data[:cut])
            assert e.value.reason == "truncated"
        assert probe(data).status == "ok"


def test_a_png_without_its_end_or_a_gif_without_its_trailer_is_truncated() -> None:
    png, gif = H["rgba.png"], H["animated.gif"]
    assert png.endswith(b"IEND\xaeB`\x82") and gif.endswith(b";")
    assert probe(png[:-12]).status == "truncated"  # every pixel is there, the file still ends early
    assert probe(gif[:-1]).status == "truncated"
    assert probe(png + b"trailing junk").status == "ok"  # data after the end is tolerated


def test_not_an_image_and_unsupported_content() -> None:
    assert probe(b"<html><body>404 not found</body></html>").status == "not_an_image"
    assert probe(b"GIF? no: just bytes").status == "not_an_image"
    assert probe(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>').status == "unsupported"
    assert probe(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic").status == "unsupported"
    # Pillow could read these, but EPS would start Ghostscript: only raster formats are opened.
    assert probe(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n").status == "unsupported"
    assert probe(_enc(Image.new("RGB", (16, 16)), "PCX")).status == "not_an_image"


def test_broken_data_after_a_good_header_is_corrupt() -> None:
    data = bytearray(_enc(Image.new("RGB", (64, 64), (200, 10, 10)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 4 : idat + 10] = b"\x00" * 6  # zlib header destroyed, the chunk layout intact
    res = probe(bytes(data))
    assert res.status == "corrupt" and res.format == "PNG", res


# ----------------------------------------------------------------------------- bombs and limits
def test_bomb_header_is_rejected_before_any_pixel_is_decoded() -> None:
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the guard is on, at Pillow's default
    # The header claims 25 MP but no pixel data follows: decoding would say "truncated"; the
    # rejection must come from the header alone.
    res = probe(bomb_png(5000, 5000), DecodeLimits(max_pixels=1_000_000))
    assert res.status == "decompression_bomb" and "header claims 5000x5000" in res.error
    assert probe(bomb_png(5000, 5000)).status == "truncated"  # under the limit it is decoded
    assert probe(bomb_png(30_000, 30_000)).status == "decompression_bomb"
    with pytest.raises(DecodeError) as e:
        decode_rgb(bomb_png(30_000, 30_000))
    assert e.value.reason == "decompression_bomb"


def test_a_real_small_file_huge_image_is_rejected() -> None:
    data = real_bomb_png()  # complete and valid: 400 MP of black in ~50 kB
    assert len(data) < 100_000
    assert probe(data).status == "decompression_bomb"
    with pytest.raises(DecodeError, match="decompression-bomb"):
        decode_rgb(data)


def test_pillows_bomb_warning_becomes_the_rejection_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both must reject, while
    # our own max_pixels (the default 89.5 MP here) would let these small images through.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters_before = list(warnings.filters)
    warned = _enc(Image.new("RGB", (40, 30)), "PNG")  # 1200 px: a warning
    raised = _enc(Image.new("RGB", (60, 50)), "PNG")  # 3000 px: an error
    for data in (warned, raised):
        res = probe(data)
        assert res.status == "decompression_bomb" and "decompression-bomb guard" in res.error
    with pytest.raises(DecodeError) as e:
        decode_rgb(warned)
    assert e.value.reason == "decompression_bomb"
    assert warnings.filters == filters_before  # no global filter left behind


def test_a_huge_valid_image_is_refused_within_the_memory_bound() -> None:
    big = _enc(Image.new("RGB", (3000, 3000), (1, 2, 3)), "PNG")
    res = probe(big, DecodeLimits(max_pixels=4_000_000))
    assert res.status == "decompression_bomb" and "not decoded" in res.error
    assert probe(big).status == "ok"


def test_too_small_uses_min_side() -> None:
    data = _enc(Image.new("RGB", (7, 40)), "PNG")
    assert probe(data).status == "too_small"
    assert probe(data, DecodeLimits(min_side=7)).status == "ok"


def test_limits_validate_with_a_message_that_says_what_to_change() -> None:
    with pytest.raises(ValueError, match="max_pixels=0: give a positive"):
        DecodeLimits(max_pixels=0)
    with pytest.raises(ValueError, match="min_side"):
        DecodeLimits(min_side=0)
    with pytest.raises(ValueError, match="RGB triple"):
        DecodeLimits(background=(0, 0, 256))
    with pytest.raises(ValueError, match="target_side"):
        decode_rgb(H["cmyk.jpg"], target_side=0)


def test_decode_error_keeps_its_reason_across_processes() -> None:
    err = pickle.loads(pickle.dumps(DecodeError("truncated", "cut")))
    assert err.reason == "truncated" and str(err) == "cut"


# ------------------------------------------------------------------------------------ modes
def test_cmyk_jpeg_decodes_to_the_original_colours() -> None:
    want = _arr(_gradient())
    got = _arr(decode_rgb(H["cmyk.jpg"]))
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 4  # JPEG loss only; an inverted CMYK would be ~128 off


def test_16_bit_gray_is_scaled_not_clipped() -> None:
    v = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    got = np.asarray(decode_rgb(H["gray16.png"]))
    assert (got[..., 0] == got[..., 2]).all()
    assert np.array_equal(got[..., 0], np.round(v / 257.0).astype(np.uint8))
    # Big-endian 16-bit (as TIFF may store it) gives the same pixels.
    be = Image.frombytes("I;16B", (64, 48), v.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(decode_rgb(_enc(be, "TIFF")))[..., 0], got[..., 0])


def test_32_bit_integer_and_float_gray() -> None:
    i32 = np.asarray(decode_rgb(H["gray32.tif"]))
    assert i32[0, 0].tolist() == [0, 0, 0] and i32[0, 39].tolist() == [233, 233, 233]  # 60000/257
    f32 = np.asarray(decode_rgb(H["float32.tif"]))
    assert f32[0, 0].tolist() == [0, 0, 0] and f32[0, 39].tolist() == [255, 255, 255]  # 0..1 floats
    wide = np.tile(np.array([-5.0, 15.0], np.float32), (10, 5))  # outside 0..1: own range
    got = np.asarray(decode_rgb(_enc(Image.fromarray(wide, "F"), "TIFF")))
    assert got[0, 0, 0] == 0 and got[0, 1, 0] == 255
    small = Image.fromarray(np.full((10, 10), 100, np.int32), "I")  # within 0..255: as is
    assert np.asarray(decode_rgb(_enc(small, "TIFF")))[0, 0].tolist() == [100, 100, 100]


def test_transparency_is_composited_on_the_fixed_background() -> None:
    pal = np.asarray(decode_rgb(H["palette_transparent.png"]))
    assert pal[5, 5].tolist() == [0, 255, 0] and pal[5, 35].tolist() == [255, 255, 255]
    la = np.asarray(decode_rgb(H["gray_alpha.png"]))
    assert la[0, 0].tolist() == [147, 147, 147]  # gray 40 at alpha 128 over white
    assert np.asarray(decode_rgb(H["rgba.png"], DecodeLimits(background=(0, 0, 0))))[3, 3].tolist() == [0, 0, 0]
    assert np.asarray(decode_rgb(H["rgba.png"]))[3, 3].tolist() == [255, 255, 255]
    pa = np.asarray(decode_rgb(H["palette_alpha.tif"], DecodeLimits(background=(128, 128, 128))))
    assert pa[5, 5].tolist() == [0, 0, 255] and pa[5, 35].tolist() == [128, 128, 128]
    # A transparency entry on a grayscale or RGB PNG (tRNS) counts too.
    l_trns = _enc(Image.new("L", (10, 10), 7), "PNG", transparency=7)
    rgb_trns = _enc(Image.new("RGB", (10, 10), (1, 2, 3)), "PNG", transparency=(1, 2, 3))
    for data in (l_trns, rgb_trns):
        assert np.asarray(decode_rgb(data, DecodeLimits(background=(9, 99, 199))))[0, 0].tolist() == [9, 99, 199]


def test_animated_gif_gives_its_first_frame() -> None:
    img = decode_rgb(H["animated.gif"])
    assert img.size == (32, 32) and np.asarray(img)[1, 1].tolist() == [255, 0, 0]


def test_one_bit_image_is_black_and_white() -> None:
    want = (np.indices((30, 40)).sum(0) % 2 * 255).astype(np.uint8)
    got = np.asarray(decode_rgb(H["one_bit.bmp"]))
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want)


def test_tiff_and_webp_decode_to_the_gradient() -> None:
    want = _arr(_gradient())
    assert np.array_equal(_arr(decode_rgb(H["image.tiff"])), want)  # lossless
    assert np.abs(_arr(decode_rgb(H["image.webp"])) - want).mean() < 6  # lossy


# ------------------------------------------------------------------------------------- EXIF
def test_exif_orientation_is_applied() -> None:
    res = probe(H["exif_rotated.jpg"])  # stored 64x32, left red / right blue, orientation 6
    assert (res.status, res.width, res.height) == ("ok", 32, 64)
    img = np.asarray(decode_rgb(H["exif_rotated.jpg"]))
    assert img.shape == (64, 32, 3)
    assert img[4, 16, 0] > 200 and img[4, 16, 2] < 60  # red on top after a quarter turn clockwise
    assert img[60, 16, 2] > 200 and img[60, 16, 0] < 60
    flipped = np.asarray(decode_rgb(exif_rotated_jpeg(3)))  # 180°: blue on the left
    assert flipped.shape == (32, 64, 3) and flipped[16, 4, 2] > 200 and flipped[16, 60, 0] > 200


def test_corrupt_or_invalid_exif_is_ignored() -> None:
    assert probe(H["corrupt_exif.jpg"]).status == "ok"
    assert np.abs(_arr(decode_rgb(H["corrupt_exif.jpg"])) - _arr(_gradient())).mean() < 4
    odd = probe(exif_rotated_jpeg(9))  # not an orientation at all: pixels as stored
    assert (odd.status, odd.width, odd.height) == ("ok", 64, 32)
    assert decode_rgb(exif_rotated_jpeg(9)).size == (64, 32)


# ------------------------------------------------------------------------------- target_side
def test_target_side_picks_the_smallest_jpeg_scale_that_keeps_the_shorter_side() -> None:
    jpeg = _enc(Image.new("RGB", (1600, 1200), (9, 9, 9)), "JPEG")
    assert decode_rgb(jpeg, target_side=256).size == (400, 300)  # 1/4: 1/8 would give 150 < 256
    assert decode_rgb(jpeg, target_side=100).size == (200, 150)  # 1/8
    assert decode_rgb(jpeg, target_side=700).size == (1600, 1200)  # 1/2 would give 600 < 700
    cmyk = decode_rgb(_enc(_gradient(640, 480).convert("CMYK"), "JPEG", quality=95), target_side=64)
    assert cmyk.mode == "RGB" and cmyk.size == (160, 120)  # 1/4: 480 / 8 = 60 < 64


def test_target_side_shrinks_other_formats_to_about_twice_the_target() -> None:
    png = _enc(Image.new("RGB", (1600, 1200), (5, 6, 7)), "PNG")
    out = decode_rgb(png, target_side=100)
    assert out.size == (267, 200) and np.asarray(out)[50, 50].tolist() == [5, 6, 7]
    panorama = _enc(Image.new("RGB", (4000, 500)), "PNG")
    assert decode_rgb(panorama, target_side=100).size == (1600, 200)  # shorter side stays >= target
    small = _enc(Image.new("RGB", (150, 120)), "PNG")
    assert decode_rgb(small, target_side=100).size == (150, 120)  # never enlarged
