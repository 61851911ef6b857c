"""Unit tests of tasks/image_io.py: safe decoding, colour conversion, resizing, encoding, captions."""

from __future__ import annotations

import errno
import io
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.image_io import (
    ImageOptions,
    InputItem,
    Rejected,
    StageOptions,
    WorkUnit,
    decode_caption_bytes,
    iter_tar_samples,
    normalize_caption,
    process_image,
    resize_image,
    stage_unit,
)


def options(**overrides) -> ImageOptions:
    base = dict(
        resolution=32,
        resize_mode="center_crop",
        image_format="png",
        quality=95,
        allowed_formats=("PNG", "JPEG", "WEBP", "GIF", "BMP"),
        max_image_pixels=4_000_000,
        pad_colour=(0, 0, 0),
        alpha_background=(255, 255, 255),
    )
    return ImageOptions(**{**base, **overrides})


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size (CRC fixed): a decompression bomb's header."""
    ihdr = png[12:29]  # b"IHDR" + 13 bytes
    body = b"IHDR" + struct.pack(">II", width, height) + ihdr[12:]
    return png[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


# --- decoding and rejects -----------------------------------------------------


def test_valid_png_is_reencoded_at_resolution_with_sha256_id():
    out = process_image(encode(noise(64, 48), "PNG"), options())
    im = Image.open(io.BytesIO(out.data))
    assert (im.format, im.size, im.mode) == ("PNG", (32, 32), "RGB")
    assert (out.orig_width, out.orig_height, out.orig_format) == (64, 48, "PNG")
    import hashlib

    assert out.sha256 == hashlib.sha256(out.data).hexdigest()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "undecodable"),
        (b"this is not an image at all", "undecodable"),
        (encode(noise(64, 64), "PNG")[:3000], "truncated"),
        (encode(noise(64, 64), "JPEG")[:1500], "truncated"),
    ],
    ids=["zero-byte", "text", "truncated-png", "truncated-jpeg"],
)
def test_bad_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(Rejected) as info:
        process_image(data, options())
    assert info.value.reason == reason
    assert info.value.detail


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # 3000 x 3000 black: a few kB on disk, 9 Mpx once decoded.
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    assert len(data) < 50_000
    with pytest.raises(Rejected) as info:
        process_image(data, options(max_image_pixels=4_000_000))
    assert info.value.reason == "bomb"


def test_header_claiming_gigapixels_is_a_bomb():
    data = with_ihdr_size(encode(Image.new("RGB", (8, 8)), "PNG"), 100_000, 100_000)
    with pytest.raises(Rejected) as info:
        process_image(data, options())
    assert info.value.reason == "bomb"


def test_configured_pixel_limit_applies_above_pillows_own(monkeypatch):
    # Pillow refuses more than 2 x Image.MAX_IMAGE_PIXELS inside open(); shrink its
    # limit (2000 px) so a 64 x 64 image (4096 px) stands for one above the default.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(noise(64, 64), "PNG")
    assert process_image(data, options(max_image_pixels=10_000)).orig_width == 64
    # Raised for the process, never lowered again: decoding threads share it, and ours applies first.
    assert Image.MAX_IMAGE_PIXELS == 10_000
    with pytest.raises(Rejected) as info:  # a lower limit of ours applies as before
        process_image(data, options(max_image_pixels=500))
    assert info.value.reason == "bomb" and Image.MAX_IMAGE_PIXELS == 10_000


def test_format_allow_list_is_enforced():
    gif = encode(noise(40, 40).convert("P"), "GIF")
    assert process_image(gif, options()).orig_format == "GIF"
    with pytest.raises(Rejected) as info:
        process_image(gif, options(allowed_formats=("PNG", "JPEG")))
    assert info.value.reason == "undecodable"
    assert "PNG/JPEG" in info.value.detail


def test_extension_does_not_matter_only_the_bytes():
    out = process_image(encode(noise(40, 40), "JPEG"), options())
    assert out.orig_format == "JPEG"


# --- colour conversion ----------------------------------------------------------


def test_alpha_is_composited_on_the_fixed_background():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # opaque blue left half
    out = decoded(process_image(encode(rgba, "PNG"), options(alpha_background=(0, 255, 0))).data)
    assert (out[:, :16] == (0, 0, 255)).all()
    assert (out[:, 16:] == (0, 255, 0)).all()


def test_palette_with_transparency_is_composited():
    p = Image.new("P", (32, 32), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 16, 32))
    p.info["transparency"] = 0
    out = decoded(process_image(encode(p, "PNG", transparency=0), options(alpha_background=(255, 255, 255))).data)
    assert (out[:, :16] == (0, 0, 255)).all()
    assert (out[:, 16:] == (255, 255, 255)).all()


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in CMYK
    out = decoded(process_image(encode(cmyk, "JPEG", quality=95), options()).data)
    assert np.abs(out.reshape(-1, 3).mean(0) - (255, 0, 0)).max() < 12


def test_greyscale_and_16_bit_greyscale_scale_properly():
    grey = decoded(process_image(encode(Image.new("L", (32, 32), 77), "PNG"), options()).data)
    assert (grey == 77).all()
    sixteen = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    out = decoded(process_image(encode(sixteen, "PNG"), options()).data)
    assert (out == 128).all()  # 32768 / 256, not clipped to 255


def test_exif_orientation_is_applied_and_orig_size_is_as_displayed():
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 means
    # "rotate 90 degrees clockwise to display": displayed 20 x 40, red on top.
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(im, "JPEG", quality=95, exif=exif.tobytes())
    out = process_image(data, options(resolution=16, resize_mode="pad"))
    assert (out.orig_width, out.orig_height) == (20, 40)
    pixels = decoded(out.data).astype(int)
    assert pixels[2, 8, 0] > 200 and pixels[2, 8, 2] < 60  # top: red
    assert pixels[13, 8, 2] > 200 and pixels[13, 8, 0] < 60  # bottom: blue


# --- resizing and encoding ---------------------------------------------------------


def test_resize_modes():
    im = Image.new("RGB", (100, 50), (200, 10, 10))
    assert resize_image(im, 32, "center_crop").size == (32, 32)
    assert resize_image(im, 32, "keep_ratio").size == (64, 32)  # shorter side = resolution
    padded = np.asarray(resize_image(im, 32, "pad", pad_colour=(0, 255, 0)))
    assert padded.shape == (32, 32, 3)
    assert (padded[0, 0] == (0, 255, 0)).all() and (padded[16, 16] == (200, 10, 10)).all()
    assert (padded[8:24, :] == (200, 10, 10)).all()  # 100x50 -> 32x16, centred
    with pytest.raises(ValueError, match="resize_mode"):
        resize_image(im, 32, "stretch")


def test_center_crop_keeps_the_centre():
    im = Image.new("RGB", (90, 30), (255, 0, 0))
    im.paste((0, 0, 255), (30, 0, 60, 30))  # blue middle third
    out = np.asarray(resize_image(im, 16, "center_crop"))
    assert (out[:, :, 2] > 200).all() and (out[:, :, 0] < 50).all()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_downscaling_filters_instead_of_sampling(fmt):
    # A 1-pixel checkerboard at 256 px: sampling would give pure black/white pixels,
    # a proper low-pass filter gives mid grey everywhere.
    board = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    data = encode(Image.fromarray(board).convert("RGB"), fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    out = decoded(process_image(data, options(resolution=32)).data).astype(float)
    assert abs(out.mean() - 127.5) < 8
    assert out.std() < 6


def test_jpeg_draft_keeps_colour_and_records_full_size():
    im = Image.new("RGB", (1024, 768), (20, 200, 90))
    out = process_image(encode(im, "JPEG", quality=95), options(resolution=32))
    assert (out.orig_width, out.orig_height) == (1024, 768)
    assert np.abs(decoded(out.data).reshape(-1, 3).mean(0) - (20, 200, 90)).max() < 4


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_output_formats(fmt, pil):
    out = process_image(encode(noise(48, 48), "PNG"), options(image_format=fmt, quality=80))
    assert Image.open(io.BytesIO(out.data)).format == pil


def test_png_output_is_lossless_and_deterministic():
    src = noise(32, 32, seed=3)
    a = process_image(encode(src, "PNG"), options())
    b = process_image(encode(src, "PNG"), options())
    assert a.data == b.data and a.sha256 == b.sha256
    assert (decoded(a.data) == np.asarray(src)).all()


# --- captions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  a red\tcircle \n\n on black  ", "a red circle on black"),
        ("caf\u00c3\u00a9 au lait", "café au lait"),  # UTF-8 read as Latin-1 (mojibake)
        ("cats &amp; dogs", "cats & dogs"),
        ("non\u00a0breaking", "non breaking"),
        ("\u201cquoted\u201d", "\u201cquoted\u201d"),  # curly quotes are the author's, kept
        ("e\u0301", "\u00e9"),  # NFC
        ("   ", ""),
    ],
)
def test_caption_normalisation(raw, clean):
    assert normalize_caption(raw) == clean


def test_caption_files_must_be_utf8():
    assert decode_caption_bytes("\ufeffhello".encode()) == "hello"
    with pytest.raises(Rejected) as info:
        decode_caption_bytes("café".encode("latin-1"))
    assert info.value.reason == "bad_caption_encoding"


# --- tar members ----------------------------------------------------------------------------


def stage_options(**overrides) -> StageOptions:
    base = dict(
        image=options(),
        caption_keys=("caption", "text"),
        max_input_bytes=1 << 20,
        http_timeout_s=1,
        http_retries=0,
        http_backoff_s=0,
        http_concurrency=1,
        row_group_rows=8,
    )
    return StageOptions(**{**base, **overrides})


def add_member(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def test_tar_samples_group_by_key_and_unsafe_members_are_flagged(tmp_path: Path):
    png = encode(noise(32, 32), "PNG")
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        add_member(tf, "a/000.png", png)
        add_member(tf, "a/000.txt", b"first")
        add_member(tf, "../escape.txt", b"x")
        add_member(tf, "/etc/evil.png", png)
        add_member(tf, "link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_member(tf, "hard.png", type=tarfile.LNKTYPE, linkname="a/000.png")
        add_member(tf, "dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add_member(tf, "001.foo.jpg", png)  # key "001", extension "foo.jpg"
        add_member(tf, "001.json", b'{"text": "second", "source": "x"}')
    samples = list(iter_tar_samples(shard, stage_options()))
    assert [(s.key, s.problem[0] if s.problem else None) for s in samples] == [
        ("a/000", None),
        ("../escape.txt", "unsafe_member"),
        ("/etc/evil.png", "unsafe_member"),
        ("link.png", "unsafe_member"),
        ("hard.png", "unsafe_member"),
        ("dev.png", "unsafe_member"),
        ("001", None),
    ]
    assert samples[0].caption == "first" and samples[0].image == png
    assert samples[-1].caption == "second" and samples[-1].image is None  # "foo.jpg" is not an image field
    assert '"source": "x"' in samples[-1].meta
    assert not (tmp_path.parent / "escape.txt").exists()


# --- staging units ----------------------------------------------------------------------------


def stage(unit: WorkUnit, stage_dir: Path) -> tuple[dict[str, int], list[dict], list[dict]]:
    for part in ("rows", "rejects"):
        (stage_dir / part).mkdir(parents=True)
    counts = stage_unit(unit, stage_options(), str(stage_dir))
    rows = pq.read_table(stage_dir / "rows", columns=["source_uri", "caption"]).to_pylist()
    rejects = pq.read_table(stage_dir / "rejects", columns=["source_uri", "reason", "detail"]).to_pylist()
    return counts, rows, rejects


@pytest.mark.parametrize(
    "name", ["0.png/x.png", "a\x00.png", "y" * 300 + ".png"], ids=["below-a-file", "nul-byte", "name-too-long"]
)
def test_file_names_that_cannot_be_opened_are_counted_rejects(tmp_path: Path, name: str):
    (tmp_path / "0.png").write_bytes(encode(noise(8, 8), "PNG"))
    items = (
        InputItem(uri=str(tmp_path / "0.png"), source_uri="0.png", caption="a good row"),
        InputItem(uri=str(tmp_path / name), source_uri=name, caption="a bad row"),
    )
    counts, rows, rejects = stage(WorkUnit(index=0, kind="files", items=items), tmp_path / "stage")
    assert counts == {"inputs": 2, "staged": 1, "rejected": 1}
    assert [(r["source_uri"], r["reason"]) for r in rejects] == [(name, "missing_file")]
    assert rejects[0]["detail"]


def test_an_io_error_reading_an_input_fails_the_run_instead_of_dropping_the_row(tmp_path: Path, monkeypatch):
    (tmp_path / "0.png").write_bytes(encode(noise(8, 8), "PNG"))

    def failing_disk(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", failing_disk)
    items = (InputItem(uri=str(tmp_path / "0.png"), source_uri="0.png", caption="a good row"),)
    with pytest.raises(OSError, match="Input/output error"):
        stage(WorkUnit(index=0, kind="files", items=items), tmp_path / "stage")


def test_a_corrupt_header_inside_a_shard_is_a_truncated_shard_reject(tmp_path: Path):
    raw = bytearray(tiny_shard(4))
    raw[2 * SAMPLE_BYTES : 2 * SAMPLE_BYTES + 512] = b"\xff" * 512  # 002.png's header: tarfile stops quietly there
    shard = tmp_path / "shard.tar"
    shard.write_bytes(bytes(raw))
    counts, rows, rejects = stage(WorkUnit(index=0, kind="tar", shard=str(shard), shard_name=shard.name), tmp_path / "stage")
    assert [r["source_uri"] for r in rows] == [f"{shard.name}#000", f"{shard.name}#001"]
    assert [(r["source_uri"], r["reason"]) for r in rejects] == [(f"{shard.name}#", "truncated_shard")]


def tiny_shard(samples: int) -> bytes:
    """Samples 000, 001, ... of an 8 x 8 PNG and a caption; each member takes a 512-byte
    header block and one 512-byte data block, so sample i starts at byte i * 2048."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(samples):
            add_member(tf, f"{i:03d}.png", encode(Image.new("RGB", (8, 8), (i, 0, 0)), "PNG"))
            add_member(tf, f"{i:03d}.txt", f"caption {i}".encode())
    return buf.getvalue()


SAMPLE_BYTES = 2048


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
@pytest.mark.parametrize(
    "cut, staged, cut_sample",
    [
        (None, 4, False),
        (2 * SAMPLE_BYTES, 2, False),  # on a member boundary, without the end-of-archive blocks
        (2 * SAMPLE_BYTES + 100, 2, False),  # inside the header of 002.png
        (2 * SAMPLE_BYTES + 1024, 2, True),  # after 002.png: its caption never came
        (2 * SAMPLE_BYTES + 1536 + 4, 2, True),  # inside the data of 002.txt
    ],
    ids=["complete", "at-boundary", "in-header", "before-caption", "in-caption"],
)
def test_cut_tar_shard_is_a_counted_reject(tmp_path: Path, caplog, suffix, cut, staged, cut_sample):
    raw = tiny_shard(4)[:cut]
    if suffix == ".tar.gz":
        # A gzip stream cut after `cut` bytes of tar: no trailer, as a cut download leaves it.
        gz = zlib.compressobj(wbits=31)
        raw = gz.compress(raw) + (gz.flush() if cut is None else gz.flush(zlib.Z_SYNC_FLUSH))
    shard = tmp_path / f"shard{suffix}"
    shard.write_bytes(raw)
    unit = WorkUnit(index=0, kind="tar", shard=str(shard), shard_name=shard.name)
    with caplog.at_level(logging.WARNING, logger="tasks.image_io"):
        counts, rows, rejects = stage(unit, tmp_path / "stage")

    assert [r["source_uri"] for r in rows] == [f"{shard.name}#{i:03d}" for i in range(staged)]
    expected = [(f"{shard.name}#002", "truncated")] if cut_sample else []
    expected += [(f"{shard.name}#", "truncated_shard")] if cut is not None else []
    assert [(r["source_uri"], r["reason"]) for r in rejects] == expected
    assert counts == {"inputs": len(rows) + len(rejects), "staged": len(rows), "rejected": len(rejects)}
    if cut is not None:
        assert shard.name in rejects[-1]["detail"]
        assert shard.name in caplog.text
