"""Worker side of ingest: read inputs, decode them safely, resize, re-encode, stage Parquet.

`tasks/ingest.py` plans the work as `WorkUnit`s (a chunk of files or URLs, or one
WebDataset tar shard) and runs `stage_unit` on each in a process pool. Every input
of a unit becomes exactly one row of `rows/part-<unit>.parquet` (decoded, at
training resolution) or of `rejects/part-<unit>.parquet` (with a reason), so the
counts always add up.

This module runs in spawned worker processes, so it imports only the standard
library, Pillow, pyarrow and ftfy (no Prefect, no torch: each worker would pay
seconds to import them).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.client
import io
import json
import logging
import re
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath

import ftfy
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# Reasons a worker rejects an input; sql/curate.sql adds too_small, bad_aspect,
# empty_caption, caption_too_short, caption_too_long and duplicate.
WORKER_REJECT_REASONS = (
    "missing_file",  # a metadata row or caption file names an image that is not there or cannot be opened
    "missing_caption",  # an image without caption (no sidecar .txt, no caption in the tar sample)
    "unsafe_path",  # a metadata file_name that leaves the source folder
    "unsafe_member",  # a tar member with an absolute path, `..`, a link or a device
    "bad_metadata",  # a metadata line or tar .json that does not parse
    "bad_caption_encoding",  # a caption file that is not UTF-8
    "caption_too_long",  # a caption file larger than MAX_CAPTION_BYTES (not even read)
    "too_large",  # an input file or download larger than max_input_bytes
    "undecodable",  # not an image in an allowed format, or corrupt
    "truncated",  # an image whose data ends early, or a tar sample its shard breaks off in
    "truncated_shard",  # a tar shard that breaks off before its end: the samples after that point are lost
    "bomb",  # more pixels than max_image_pixels (decompression bomb)
    "bad_url",  # a URL that is empty, malformed or not http(s), or redirects to such a URL
    "http_error",  # an HTTP status other than 200 after retries
    "timeout",  # no complete answer within http_timeout_s after retries
    "download_failed",  # connection refused, DNS failure, broken HTTP, body cut short, ... after retries
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
# Caption files beyond this size are rejected unread, so one bad file cannot
# exhaust a worker's memory; the configurable length limit is applied in SQL.
MAX_CAPTION_BYTES = 4 << 20
# Rejects keep the start of the caption only: enough to find the input again.
REJECT_CAPTION_PREVIEW = 200

ROW_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),  # (unit index << 32) | position in unit: stable input order
        ("id", pa.string()),  # sha256 of `image`
        ("caption", pa.string()),
        ("caption_chars", pa.int32()),  # code points, counted here so SQL needs no Unicode rules
        ("image", pa.binary()),  # encoded at training resolution
        ("width", pa.int32()),  # of `image`
        ("height", pa.int32()),
        ("orig_width", pa.int32()),  # as displayed (after EXIF orientation)
        ("orig_height", pa.int32()),
        ("orig_format", pa.string()),  # what the bytes are, whatever the file name says
        ("source_uri", pa.string()),
        ("meta", pa.string()),  # JSON object of extra metadata columns ("{}" if none)
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),
        ("source_uri", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("caption", pa.string()),  # first REJECT_CAPTION_PREVIEW characters, if known
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("id", pa.string()),
    ]
)


class Rejected(Exception):
    """An input that cannot become a row; `reason` is one of WORKER_REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    resolution: int
    resize_mode: str  # center_crop | pad | keep_ratio
    image_format: str  # png | webp | jpeg
    quality: int
    allowed_formats: tuple[str, ...]
    max_image_pixels: int
    pad_colour: tuple[int, int, int]
    alpha_background: tuple[int, int, int]


@dataclass(frozen=True)
class StageOptions:
    image: ImageOptions
    caption_keys: tuple[str, ...]  # keys of a tar sample's .json that may hold the caption
    max_input_bytes: int
    http_timeout_s: float
    http_retries: int
    http_backoff_s: float
    http_concurrency: int
    row_group_rows: int


@dataclass(frozen=True)
class InputItem:
    """One input of a file or URL unit. `reject` is set when planning already knows why it fails."""

    uri: str  # absolute path, or URL
    source_uri: str  # what the row records: path relative to the source root, or URL
    caption: str | None = None  # inline caption (metadata file, URL list)
    caption_path: str | None = None  # sidecar caption file
    meta: str | None = None  # JSON object
    reject: tuple[str, str] | None = None


@dataclass(frozen=True)
class WorkUnit:
    index: int
    kind: str  # files | urls | tar
    items: tuple[InputItem, ...] = ()
    shard: str | None = None  # tar: absolute path
    shard_name: str | None = None  # tar: path relative to the source root


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    sha256: str
    width: int
    height: int
    orig_width: int
    orig_height: int
    orig_format: str


# ---------------------------------------------------------------------------
# Decode, convert, resize, encode


def process_image(data: bytes, opts: ImageOptions) -> ProcessedImage:
    """Decode untrusted bytes and return them re-encoded at the training resolution.

    Raises `Rejected` with reason undecodable, truncated or bomb. Pillow only tries
    the parsers in `allowed_formats`; the pixel count is checked from the header
    against `max_image_pixels`, before any pixel is decoded; `load()` runs inside
    the error handling, since Pillow decodes lazily and a truncated file only fails there.
    """
    if not data:
        raise Rejected("undecodable", "empty file (0 bytes)")
    _lift_pillow_pixel_limit(opts.max_image_pixels)
    try:
        im = Image.open(io.BytesIO(data), formats=list(opts.allowed_formats))
    except Image.DecompressionBombError as exc:
        raise Rejected("bomb", str(exc)) from None
    except UnidentifiedImageError:
        raise Rejected("undecodable", f"not a {'/'.join(opts.allowed_formats)} image") from None
    except Exception as exc:  # Pillow's parsers raise many types on hostile headers
        raise Rejected(_decode_error_reason(exc), f"{type(exc).__name__}: {exc}") from None
    with im:
        width, height = im.size
        if width * height > opts.max_image_pixels:
            raise Rejected("bomb", f"{width}x{height} is more than max_image_pixels={opts.max_image_pixels}")
        orig_format = im.format or "unknown"
        try:
            orientation = _exif_orientation(im)
            if orientation in (5, 6, 7, 8):  # these orientations swap the axes
                width, height = height, width
            _draft(im, width, height, opts)
            im.load()
            upright = ImageOps.exif_transpose(im) if orientation != 1 else im
            rgb = _to_rgb(upright, opts.alpha_background)
            out = resize_image(rgb, opts.resolution, opts.resize_mode, opts.pad_colour)
            encoded = encode_image(out, opts.image_format, opts.quality)
        except Image.DecompressionBombError as exc:
            raise Rejected("bomb", str(exc)) from None
        except Exception as exc:  # whatever hostile input does, it is one reject, not a failed run
            raise Rejected(_decode_error_reason(exc), f"{type(exc).__name__}: {exc}") from None
    return ProcessedImage(
        data=encoded,
        sha256=hashlib.sha256(encoded).hexdigest(),
        width=out.width,
        height=out.height,
        orig_width=width,
        orig_height=height,
        orig_format=orig_format,
    )


def _lift_pillow_pixel_limit(max_image_pixels: int) -> None:
    """Raise Pillow's own bomb limit to `max_image_pixels` where ours is higher.

    Pillow refuses more than 2 x Image.MAX_IMAGE_PIXELS (179 Mpx by default) when it opens
    or loads an image, so a higher max_image_pixels would never apply. The limit is one per
    process and decoding threads share it, so it is only ever raised, never put back: our
    own check from the header (`process_image`) is the one that applies, Pillow's a second
    guard behind it."""
    if Image.MAX_IMAGE_PIXELS is None or max_image_pixels <= Image.MAX_IMAGE_PIXELS:
        return  # every image but the first few: no lock taken
    with _pillow_limit_lock:  # two threads raising it to different values: the larger stays
        if Image.MAX_IMAGE_PIXELS is not None and max_image_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_image_pixels


_pillow_limit_lock = threading.Lock()


def _decode_error_reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "truncated"
    return "undecodable"


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block is not a reason to drop the pixels
        return 1


def _draft(im: Image.Image, width: int, height: int, opts: ImageOptions) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when the target is much smaller.

    We ask for at least twice the size the resize needs, so the final Lanczos pass
    still filters properly; this is where most of ingest's per-core speed comes from.
    """
    if im.format != "JPEG":
        return
    side = max(width, height) if opts.resize_mode == "pad" else min(width, height)
    scale = 2 * opts.resolution / side
    if scale < 0.5:
        im.draft(im.mode, (max(1, int(im.width * scale) + 1), max(1, int(im.height * scale) + 1)))


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Palette, greyscale, 16-bit, CMYK and alpha images to plain RGB.

    Transparent pixels are composited on a fixed `background`: what a transparent
    pixel "is" must not depend on the colour an encoder left under it.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: Pillow's convert("L") clips at 255; scale to 8 bits instead.
        im = im.convert("I").point(lambda v: v / 256).convert("L")
    elif im.mode == "F":
        im = im.point(lambda v: v * 255).convert("L")
    has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


def resize_image(im: Image.Image, resolution: int, mode: str, pad_colour: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Resize an RGB image for training.

    center_crop: the largest centred square, scaled to resolution x resolution.
    pad: the whole image scaled so its longer side is `resolution`, centred on `pad_colour`.
    keep_ratio: scaled so its shorter side is `resolution`, aspect kept (img2dataset's keep_ratio).
    Downscaling is Lanczos after an integer box reduction that leaves at least a 2x
    Lanczos step (`reducing_gap=2`): 2-4x faster than a full Lanczos pass from the
    original, and within 48 dB PSNR of it on photos and on hard-edged patterns
    (measured at 256 -> 32 and 256 -> 64 px). Upscaling is bicubic.
    """
    w, h = im.size
    if mode == "center_crop":
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return _resample(im, (resolution, resolution), side, resolution, box)
    if mode == "pad":
        scale = resolution / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        scaled = _resample(im, size, max(w, h), resolution)
        canvas = Image.new("RGB", (resolution, resolution), pad_colour)
        canvas.paste(scaled, ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
        return canvas
    if mode == "keep_ratio":
        scale = resolution / min(w, h)
        return _resample(im, (max(1, round(w * scale)), max(1, round(h * scale))), min(w, h), resolution)
    raise ValueError(f"unknown resize_mode {mode!r}; use center_crop, pad or keep_ratio")


def _resample(im: Image.Image, size: tuple[int, int], src_side: int, dst_side: int, box=None) -> Image.Image:
    if size == im.size and box is None:
        return im
    if dst_side < src_side:
        return im.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)
    return im.resize(size, Image.Resampling.BICUBIC, box=box)


def encode_image(im: Image.Image, image_format: str, quality: int) -> bytes:
    """PNG is lossless (the default); WebP and JPEG use `quality`."""
    buf = io.BytesIO()
    if image_format == "png":
        im.save(buf, "PNG")
    elif image_format == "webp":
        im.save(buf, "WEBP", quality=quality, method=4)
    elif image_format == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image_format {image_format!r}; use png, webp or jpeg")
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Captions

# ftfy repairs mojibake ("cafÃ©" -> "café"), HTML entities and control characters,
# but leaves quotes, ligatures and full-width characters as the author wrote them.
_FTFY_CONFIG = ftfy.TextFixerConfig(
    uncurl_quotes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    normalization="NFC",
    explain=False,
)
_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Unicode repair, then every whitespace run (newlines, tabs, NBSP) becomes one space."""
    return _WHITESPACE.sub(" ", ftfy.fix_text(text, _FTFY_CONFIG)).strip()


def decode_caption_bytes(data: bytes) -> str:
    """Caption files must be UTF-8 (a BOM is allowed); guessing another encoding would invent text."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Rejected("bad_caption_encoding", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _read_caption_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except FileNotFoundError:
        raise Rejected("missing_caption", f"caption file {path.name} not found") from None
    if len(data) > MAX_CAPTION_BYTES:
        raise Rejected("caption_too_long", f"caption file larger than {MAX_CAPTION_BYTES} bytes")
    return decode_caption_bytes(data)


# ---------------------------------------------------------------------------
# Reading inputs


# Errors that a metadata row's file name causes (a name below a file, too long, a directory,
# a link loop, no permission): that row's reject.
_BAD_NAME_ERRNOS = frozenset({errno.ENOTDIR, errno.ENAMETOOLONG, errno.EISDIR, errno.ELOOP, errno.EACCES, errno.EINVAL})


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise Rejected("missing_file", f"{path.name} is not a regular file")
        if size > max_bytes:
            raise Rejected("too_large", f"{size} bytes > max_input_bytes={max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise Rejected("missing_file", f"{path.name} not found") from None
    except OSError as exc:
        if exc.errno not in _BAD_NAME_ERRNOS:  # an I/O error is the machine's, not the row's: the run fails
            raise
        raise Rejected("missing_file", f"cannot open {path.name!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte in the name
        raise Rejected("missing_file", f"cannot open {path.name!r}: {exc}") from None


_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def _http_opener(deadline: float) -> urllib.request.OpenerDirector:
    # Only HTTP(S) and redirects between them: no file://, ftp:// or data: handlers,
    # so a URL list cannot make us read local files.
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        _DeadlineHTTPHandler(deadline),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


class _DeadlineHTTPHandler(urllib.request.AbstractHTTPHandler):
    """urllib's HTTP and HTTPS handlers, over connections that all end by one deadline."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPConnection, deadline=self.deadline), req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_DeadlineHTTPSConnection, deadline=self.deadline), req)

    http_request = https_request = urllib.request.AbstractHTTPHandler.do_request_


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, deadline: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        self.timeout = _time_left(self.deadline)  # a redirect's connect gets only what is left
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.deadline)


class _DeadlineHTTPSConnection(_DeadlineHTTPConnection, http.client.HTTPSConnection):
    pass  # connect() wraps the socket after HTTPSConnection's TLS handshake


class _DeadlineSocket:
    """A connected socket whose reads all end by `deadline`.

    http.client gives each read of the status line, headers and body the full timeout,
    so a server sending one byte per timeout could hold a download for ever; here each
    read waits at most the time left. Everything but `makefile` is the socket's own.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def __getattr__(self, name: str):
        return getattr(self._sock, name)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:  # http.client only reads ("rb")
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline
        # The socket's own raw file keeps the socket open until this file is closed,
        # as http.client expects of a response's file.
        self._raw = sock.makefile("rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self._sock.settimeout(_time_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("download deadline passed")
    return left


def fetch_url(url: str, opts: StageOptions) -> bytes:
    """GET `url` with a whole-download deadline, retrying transient failures with backoff.

    `http_timeout_s` bounds each attempt from connect to the last byte, redirects
    included, so a server that trickles bytes cannot hold a worker for long. 4xx
    answers other than 408/425/429 are final and not retried, and so is a malformed
    URL in a redirect.
    """
    last = Rejected("download_failed", "no attempt made")
    for attempt in range(opts.http_retries + 1):
        if attempt:
            time.sleep(opts.http_backoff_s * 2 ** (attempt - 1))
        try:
            return _fetch_once(url, opts)
        except urllib.error.HTTPError as exc:
            last = Rejected("http_error", f"HTTP {exc.code} {exc.reason}")
            if exc.code not in _RETRY_STATUS:
                raise last from None
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            last = Rejected("timeout", f"no complete answer within {opts.http_timeout_s} s ({exc})")
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                last = Rejected("timeout", f"no answer within {opts.http_timeout_s} s")
            else:
                last = Rejected("download_failed", str(exc.reason))
        except Rejected:
            raise
        except (http.client.InvalidURL, ValueError) as exc:  # a redirect to a malformed URL
            raise Rejected("bad_url", f"{type(exc).__name__}: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:  # connection reset, bad status line, body cut short, ...
            last = Rejected("download_failed", f"{type(exc).__name__}: {exc}")
    raise Rejected(last.reason, f"{last.detail} (after {opts.http_retries + 1} attempts)")


def _fetch_once(url: str, opts: StageOptions) -> bytes:
    opener = _http_opener(time.monotonic() + opts.http_timeout_s)
    request = urllib.request.Request(url, headers={"User-Agent": "t2i-pipeline-ingest/0.1"})
    with opener.open(request, timeout=opts.http_timeout_s) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdecimal() else None
        if expected is not None and expected > opts.max_input_bytes:
            raise Rejected("too_large", f"Content-Length {length} > max_input_bytes={opts.max_input_bytes}")
        chunks, total = [], 0
        while chunk := response.read1(64 * 1024):
            total += len(chunk)
            if total > opts.max_input_bytes:
                raise Rejected("too_large", f"more than max_input_bytes={opts.max_input_bytes}")
            chunks.append(chunk)
        if expected is not None and total < expected:  # http.client ends such a body quietly
            raise http.client.IncompleteRead(b"".join(chunks), expected - total)
        return b"".join(chunks)


def check_url(url: str | None) -> tuple[str, str] | None:
    """A planning-time check: why `url` cannot be fetched, or None."""
    if not url or not isinstance(url, str):
        return ("bad_url", "empty URL")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        return ("bad_url", f"malformed URL: {exc}")
    if parts.scheme not in ("http", "https"):
        return ("bad_url", f"scheme {parts.scheme or '(none)'!r} is not http or https")
    if not parts.hostname:
        return ("bad_url", "no host name")
    return None


# ---------------------------------------------------------------------------
# Tar shards (WebDataset)


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith("/") or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        return f"absolute path {name!r}"
    if ".." in PurePosixPath(name).parts:
        return f"parent reference in {name!r}"
    if member.issym() or member.islnk():
        return f"link {name!r} -> {member.linkname!r}"
    if member.ischr() or member.isblk() or member.isfifo():
        return f"device or fifo {name!r}"
    if not member.isfile():
        return f"not a regular file: {name!r}"
    return None


def _split_key(name: str) -> tuple[str, str]:
    # WebDataset: the key is the path up to the first dot of the file name.
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


@dataclass
class _TarSample:
    key: str
    image: bytes | None = None
    image_name: str | None = None
    caption: str | None = None
    meta: str | None = None
    problem: tuple[str, str] | None = None
    exts: tuple[str, ...] = ()


class ShardBreaksOff(tarfile.TarError):
    """A tar shard that ends, or cannot be read further, before its end-of-archive blocks."""


def iter_tar_samples(path: Path, opts: StageOptions) -> Iterator[_TarSample]:
    """Stream a shard member by member; members of one sample are adjacent (WebDataset).

    Nothing is ever extracted to disk: regular members are read into memory with
    `extractfile`, one sample at a time; unsafe members become samples of their
    own carrying an unsafe_member problem, so each one is counted as a reject.
    A shard that breaks off (a cut download or copy) raises `ShardBreaksOff` after
    its last sample; that sample, if it lacks its image or caption, carries a
    truncated problem rather than looking like a sample without caption.
    """
    image_exts = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    current: _TarSample | None = None
    marker: list[bool] = []  # one entry once the end-of-archive block is read
    with tarfile.open(path, mode="r|*", tarinfo=_marker_noting_tarinfo(marker)) as tf:
        try:
            for member in tf:
                if member.isdir():
                    continue
                problem = _member_problem(member)
                if problem is not None:
                    if current is not None:
                        yield current
                        current = None
                    yield _TarSample(key=member.name, problem=("unsafe_member", problem))
                    continue
                key, ext = _split_key(member.name)
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = _TarSample(key=key)
                current.exts += (ext,)
                if current.problem is not None:
                    continue
                is_image = ext in image_exts
                is_caption = ext in ("txt", "json")
                if not (is_image or is_caption) or (is_image and current.image is not None):
                    continue  # other fields (cls, a second image, ...) are not ours
                limit = opts.max_input_bytes if is_image else MAX_CAPTION_BYTES
                if member.size > limit:
                    reason = "too_large" if is_image else "caption_too_long"
                    current.problem = (reason, f"member {member.name} has {member.size} bytes > {limit}")
                    continue
                data = tf.extractfile(member).read()
                try:
                    if is_image:
                        current.image, current.image_name = data, member.name
                    elif ext == "txt":
                        current.caption = decode_caption_bytes(data)
                    elif current.caption is None or current.meta is None:
                        caption, meta = _caption_from_json(data, opts.caption_keys)
                        current.meta = meta
                        if current.caption is None:
                            current.caption = caption
                except Rejected as exc:
                    current.problem = (exc.reason, exc.detail)
            broken = None if marker else "it breaks off before its end-of-archive block (cut or corrupt)"
        except (tarfile.TarError, EOFError) as exc:  # cut inside a member, corrupt compressed data, ...
            broken = f"{type(exc).__name__}: {exc}"
        if current is not None:
            if broken and current.problem is None and (current.image is None or current.caption is None):
                current.problem = ("truncated", f"the shard breaks off inside this sample ({broken})")
            yield current
    if broken:
        raise ShardBreaksOff(broken)


def _marker_noting_tarinfo(marker: list[bool]) -> type[tarfile.TarInfo]:
    """A TarInfo class that appends to `marker` when tarfile reads the end-of-archive block.

    tarfile ends its iteration the same quiet way at that zero block, at a missing or
    partial header (a cut file) and at a corrupt header past the first member; only the
    first is a proper end. tarfile tells them apart by the header error it raises inside
    `fromtarfile`: EOFHeaderError is the zero block's."""

    class MarkerNotingTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tf)
            except tarfile.EOFHeaderError:
                marker.append(True)
                raise

    return MarkerNotingTarInfo


def _caption_from_json(data: bytes, keys: tuple[str, ...]) -> tuple[str | None, str]:
    try:
        obj = json.loads(decode_caption_bytes(data))
    except json.JSONDecodeError as exc:
        raise Rejected("bad_metadata", f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise Rejected("bad_metadata", "JSON is not an object")
    caption = next((obj[k] for k in keys if obj.get(k) is not None), None)
    meta = {k: v for k, v in obj.items() if k not in keys}
    return (None if caption is None else str(caption)), json.dumps(meta, sort_keys=True, default=str)


# ---------------------------------------------------------------------------
# Staging


class _PartWriter:
    """Buffers rows and writes a Parquet row group every `rows` rows or 32 MiB."""

    def __init__(self, path: Path, schema: pa.Schema, rows: int) -> None:
        self.path, self.schema, self.rows = path, schema, rows
        self.buffer: list[dict] = []
        self.buffered_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.count = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        self.count += 1
        self.buffered_bytes += len(row.get("image") or b"") + len(row.get("caption") or "")
        if len(self.buffer) >= self.rows or self.buffered_bytes >= 32 << 20:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            # Encoded images do not compress further; the other columns do.
            self.writer = pq.ParquetWriter(
                self.path, self.schema, compression={n: ("none" if n == "image" else "zstd") for n in self.schema.names}
            )
        self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.buffer, self.buffered_bytes = [], 0

    def close(self) -> None:
        self._flush()
        if self.writer is None:  # an empty part still carries the schema, so globs always match
            pq.write_table(self.schema.empty_table(), self.path)
        else:
            self.writer.close()


class _Stager:
    def __init__(self, unit: WorkUnit, opts: StageOptions, stage_dir: Path) -> None:
        self.unit, self.opts = unit, opts
        name = f"part-{unit.index:06d}.parquet"
        self.rows = _PartWriter(stage_dir / "rows" / name, ROW_SCHEMA, opts.row_group_rows)
        self.rejects = _PartWriter(stage_dir / "rejects" / name, REJECT_SCHEMA, opts.row_group_rows)
        self.position = 0

    def _ordinal(self) -> int:
        ordinal = (self.unit.index << 32) | self.position
        self.position += 1
        return ordinal

    def reject(self, source_uri: str, reason: str, detail: str, caption: str | None = None, image: ProcessedImage | None = None) -> None:
        self.rejects.add(
            {
                "ordinal": self._ordinal(),
                "source_uri": source_uri,
                "reason": reason,
                "detail": detail,
                "caption": None if caption is None else caption[:REJECT_CAPTION_PREVIEW],
                "orig_width": image.orig_width if image else None,
                "orig_height": image.orig_height if image else None,
                "id": image.sha256 if image else None,
            }
        )

    def accept(self, source_uri: str, caption: str, image: ProcessedImage, meta: str | None) -> None:
        self.rows.add(
            {
                "ordinal": self._ordinal(),
                "id": image.sha256,
                "caption": caption,
                "caption_chars": len(caption),
                "image": image.data,
                "width": image.width,
                "height": image.height,
                "orig_width": image.orig_width,
                "orig_height": image.orig_height,
                "orig_format": image.orig_format,
                "source_uri": source_uri,
                "meta": meta or "{}",
            }
        )

    def add(self, source_uri: str, raw_caption: str | None, data: bytes | None, meta: str | None, problem: Rejected | None) -> None:
        """Turn one input into a row or a reject; every call adds exactly one of the two."""
        caption = None if raw_caption is None else normalize_caption(raw_caption)
        if problem is not None:
            self.reject(source_uri, problem.reason, problem.detail, caption)
            return
        try:
            image = process_image(data or b"", self.opts.image)
        except Rejected as exc:
            self.reject(source_uri, exc.reason, exc.detail, caption)
            return
        if caption is None:
            self.reject(source_uri, "missing_caption", "no caption for this image", None, image)
            return
        self.accept(source_uri, caption, image, meta)

    def close(self) -> dict[str, int]:
        self.rows.close()
        self.rejects.close()
        return {"inputs": self.position, "staged": self.rows.count, "rejected": self.rejects.count}


def stage_unit(unit: WorkUnit, opts: StageOptions, stage_dir: str) -> dict[str, int]:
    """Process one unit into `stage_dir/{rows,rejects}/part-<index>.parquet`; return its counts."""
    stager = _Stager(unit, opts, Path(stage_dir))
    if unit.kind == "files":
        for item in unit.items:
            _stage_file_item(stager, item, opts)
    elif unit.kind == "urls":
        _stage_url_items(stager, unit.items, opts)
    elif unit.kind == "tar":
        _stage_tar(stager, unit, opts)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    return stager.close()


def _stage_file_item(stager: _Stager, item: InputItem, opts: StageOptions) -> None:
    if item.reject is not None:
        stager.add(item.source_uri, item.caption, None, item.meta, Rejected(*item.reject))
        return
    caption = item.caption
    try:
        data = _read_file(Path(item.uri), opts.max_input_bytes)
        if item.caption_path is not None:
            caption = _read_caption_file(Path(item.caption_path))
    except Rejected as exc:
        stager.add(item.source_uri, caption, None, item.meta, exc)
        return
    stager.add(item.source_uri, caption, data, item.meta, None)


def _stage_url_items(stager: _Stager, items: tuple[InputItem, ...], opts: StageOptions) -> None:
    def download(item: InputItem) -> bytes | Rejected:
        if item.reject is not None:
            return Rejected(*item.reject)
        try:
            return fetch_url(item.uri, opts)
        except Rejected as exc:
            return exc

    # Threads only wait on sockets; decoding stays on this thread, in input order. At
    # most `http_concurrency` downloads are in flight or waiting, which bounds memory.
    width = max(1, min(opts.http_concurrency, len(items)))
    pending = iter(items)
    with ThreadPoolExecutor(max_workers=width) as pool:
        window = deque((item, pool.submit(download, item)) for item in islice(pending, width))
        while window:
            item, future = window.popleft()
            result = future.result()
            following = next(pending, None)
            if following is not None:
                window.append((following, pool.submit(download, following)))
            if isinstance(result, Rejected):
                stager.add(item.source_uri, item.caption, None, item.meta, result)
            else:
                stager.add(item.source_uri, item.caption, result, item.meta, None)


def _stage_tar(stager: _Stager, unit: WorkUnit, opts: StageOptions) -> None:
    assert unit.shard is not None and unit.shard_name is not None
    try:
        for sample in iter_tar_samples(Path(unit.shard), opts):
            uri = f"{unit.shard_name}#{sample.key}"
            problem = Rejected(*sample.problem) if sample.problem else None
            if problem is None and sample.image is None:
                found = ", ".join(sample.exts) or "nothing"
                problem = Rejected("missing_file", f"sample has no image member (found: {found})")
            stager.add(uri, sample.caption, sample.image, sample.meta, problem)
    except ShardBreaksOff as exc:
        # Samples read so far are kept; the lost rest of the shard is one more reject.
        detail = f"tar shard {unit.shard_name} breaks off: {exc}; the samples after that point are lost"
        log.warning("%s", detail)
        stager.add(f"{unit.shard_name}#", None, None, None, Rejected("truncated_shard", detail))
    except tarfile.TarError as exc:  # not a tar shard at all
        stager.add(f"{unit.shard_name}#", None, None, None, Rejected("undecodable", f"tar shard: {exc}"))
