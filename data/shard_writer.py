"""Image folder + caption table (CSV / JSONL / Parquet) -> webdataset shards + manifest."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# Suffix -> shard member for the formats the reader takes (its image_key, jpg;png;webp):
# these files are stored byte for byte. Any other image PIL decodes is stored as PNG.
IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Modes a PNG holds as they are; any other (CMYK, YCbCr, 32-bit int, float) is stored as
# its RGB conversion, the pixels the reader's convert("RGB") would give it anyway.
PNG_MODES = {"1", "L", "LA", "I;16", "P", "RGB", "RGBA"}


class MissingImagesError(FileNotFoundError):
    """Rows of the caption table whose image file does not exist."""

    def __init__(self, missing: list[str], images_dir: Path):
        self.missing = missing
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        super().__init__(f"{len(missing)} image file(s) listed in the captions are missing "
                         f"under {images_dir}:\n  {shown}{more}\n(use --skip-missing to "
                         "write the others and skip these)")


def _parse_tags(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            return [t.strip() for t in text.split(",") if t.strip()]
    if hasattr(value, "tolist"):  # numpy arrays from Parquet list columns
        value = value.tolist()
    return [str(t).strip() for t in value if str(t).strip()]


CAPTION_COLUMNS = ("path", "caption")  # required; "tags" is optional
CAPTION_FORMATS = {".csv": "CSV", ".jsonl": "JSON lines", ".ndjson": "JSON lines",
                   ".parquet": "Parquet", ".pq": "Parquet"}


def read_caption_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"path", "caption", "tags"}`` from a .csv, .jsonl/.ndjson or .parquet file
    with columns ``path``, ``caption`` and optionally ``tags`` (a list, a JSON list string,
    or comma separated text).

    A table that cannot be used raises ``ValueError`` in one line naming ``--captions``, the
    file and why: not found, unreadable, not of its suffix's format, without a required
    column or value (naming the line or row), or without any row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--captions {path}: " + ("not a file" if path.exists()
                                                   else "not found"))
    suffix = path.suffix.lower()
    kind = CAPTION_FORMATS.get(suffix)
    if kind is None:
        raise ValueError(f"--captions {path}: unknown format {suffix!r}; use .csv, .jsonl "
                         "or .parquet")
    try:
        if kind == "CSV":
            rows = _read_csv(path)
        elif kind == "JSON lines":
            rows = _read_jsonl(path)
        else:
            rows = _read_parquet(path)
    except UnicodeDecodeError:  # a spreadsheet or archive under a text suffix
        # (no offset shown: the error's counts from the decoder's chunk, not the file's start)
        raise ValueError(f"--captions {path}: not UTF-8 text, not a {kind} file") from None
    except OSError as err:
        raise ValueError(f"--captions {path}: cannot be read ({type(err).__name__}: "
                         f"{err.strerror or err})") from None
    if not rows:
        raise ValueError(f"--captions {path}: no rows (expected columns "
                         "path, caption[, tags])")
    table = []
    for where, row in rows:
        for column in CAPTION_COLUMNS:
            if column not in row:
                raise ValueError(f"--captions {path}: {where} has no {column!r} column "
                                 f"(columns: {', '.join(map(str, row))})")
            if row[column] is None:  # a short CSV row, a JSON/Parquet null
                raise ValueError(f"--captions {path}: {where} has no {column!r} value")
        if not str(row["path"]).strip():
            raise ValueError(f"--captions {path}: {where} has an empty 'path'")
        for column in CAPTION_COLUMNS:
            try:  # JSON's "\udc80" escapes decode to lone surrogates, which UTF-8 cannot hold
                str(row[column]).encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"--captions {path}: {where}: its {column!r} holds "
                                 f"{err.object[err.start:err.end]!r}, which is no Unicode "
                                 "character (a lone surrogate)") from None
        try:
            tags = _parse_tags(row.get("tags"))
        except (ValueError, TypeError) as err:  # "[..." that is no JSON, a number
            raise ValueError(f"--captions {path}: {where}: 'tags' is not a list or comma "
                             f"separated text ({err})") from None
        table.append({"path": str(row["path"]), "caption": str(row["caption"]),
                      "tags": tags})
    return table


def _read_csv(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a CSV file with a header line; a header without the required
    columns (another delimiter, no header, not a CSV file) is refused as such."""
    # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte order mark, which would be part
    # of the first column's name ("\ufeffpath") and hide the path column
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
            absent = [c for c in CAPTION_COLUMNS if c not in header]
            if header and absent:
                raise ValueError(f"--captions {path}: its header line has no "
                                 f"{' or '.join(map(repr, absent))} column (header: "
                                 f"{','.join(header)[:200]}); expected columns "
                                 "path, caption[, tags], comma separated")
            return [(f"line {reader.line_num}", row) for row in reader]
        except csv.Error as err:  # a NUL byte, an unterminated quote
            raise ValueError(f"--captions {path}: not a CSV file (line {reader.line_num}: "
                             f"{err})") from None


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a JSON lines file: one JSON object a line, blank lines ignored."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--captions {path}: line {n} is not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"--captions {path}: line {n} is not a JSON object")
        rows.append((f"line {n}", row))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of a Parquet file (pyarrow, else pandas with another engine)."""
    needs = (f"--captions {path}: reading Parquet needs pyarrow; install it with "
             "`pip install pyarrow` (or use CSV/JSONL)")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            rows = pq.read_table(path).to_pylist()
        else:
            import pandas as pd

            rows = pd.read_parquet(path).to_dict("records")
    except ImportError:  # no pandas, or pandas without a Parquet engine
        raise ValueError(needs) from None
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"--captions {path}: not a Parquet file ({type(err).__name__}: "
                         f"{str(err)[:200]})") from None
    return [(f"row {i + 1}", row) for i, row in enumerate(rows)]


class UnreadableImage(ValueError):
    """A row the reader would skip: its file is not an image it could decode, or its
    caption is blank; ``reason`` names why, as the reader's skip counts do
    (``not_an_image``, ``undecodable_image``, ``oversized_image``, ``empty_caption``)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def image_member(file: Path, max_pixels: int = Image.MAX_IMAGE_PIXELS
                 ) -> tuple[str, bytes, bool]:
    """``(member, bytes, transcoded)`` to store for the image ``file``: a jpg/jpeg/png/webp
    file byte for byte under its own member, any other image PIL decodes (bmp, tif, gif,
    ...) as a PNG of its first frame under ``png`` (``transcoded``). Every file is decoded
    once, as the reader does, so a sample is written only if the reader can read it; one
    that cannot be raises :class:`UnreadableImage`: so does one of more than ``max_pixels``
    pixels, which the reader skips (``data.max_image_pixels``, PIL's limit by default)."""
    data = file.read_bytes()
    try:
        with warnings.catch_warnings():
            # large but legal images: the reader silences the same warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if width * height > max_pixels:  # the reader skips it, as oversized_image
                raise UnreadableImage("oversized_image",
                                      f"{width}x{height} pixels > limit {max_pixels}")
            member = IMAGE_EXTS.get(file.suffix.lower())
            if member is not None and img.format == "JPEG":
                # only checked, not kept: a 1/8-scale decode still reads every byte
                img.draft("RGB", (1, 1))
            img.load()  # truncated or corrupt data raises here
            if member is not None:
                return member, data, False
            out = io.BytesIO()
            (img if img.mode in PNG_MODES else img.convert("RGB")).save(out, format="PNG")
            return "png", out.getvalue(), True
    except UnreadableImage:
        raise
    except UnidentifiedImageError as err:  # a text file, an empty file, random bytes
        raise UnreadableImage("not_an_image", "no image format PIL knows") from err
    except Image.DecompressionBombError as err:  # beyond twice PIL's limit: so does the reader
        raise UnreadableImage("oversized_image", str(err)) from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for damaged data
        raise UnreadableImage("undecodable_image", f"{type(err).__name__}: {err}") from err


class ShardWriteError(RuntimeError):
    """Writing stopped part-way (an image file that could not be read, a full disk) or
    wrote no sample; the shards begun were removed and no manifest was written."""


def write_shards(images_dir: str | Path, captions: str | Path, out_pattern: str,
                 maxcount: int = 10000, maxsize: int = 1_000_000_000,
                 skip_missing: bool = False, progress: bool = True,
                 overwrite: bool = False,
                 max_pixels: int = Image.MAX_IMAGE_PIXELS) -> dict[str, Any]:
    """Write one sample per caption row (``jpg|png|webp``, ``txt``, ``json`` with tags and
    the original path) into shards named by ``out_pattern`` (e.g. ``out/data-%06d.tar``);
    write ``manifest.json`` next to them and return it.

    Bad input is refused before anything is written, as a ``ValueError`` in one line naming
    its flag (``--images`` not a folder or holding none of the images, ``--captions``
    unusable, see :func:`read_caption_table`, ``--out`` without one number field or not
    writable, or its folder holding shards of the pattern already, unless ``overwrite``:
    then they are removed first). Missing image files raise :class:`MissingImagesError`
    listing them, unless ``skip_missing`` (then they are left out and counted in the
    manifest). Images in other formats are stored as PNG (counted, ``transcoded``); a file
    that is no image the reader could decode (or has more than ``max_pixels`` pixels) is
    left out, counted by reason (``skipped_unreadable``) and named in a warning, as is a
    row whose caption is blank (``empty_caption``: the reader skips it too); an image's
    fault is only known once it is decoded, while writing, unlike a missing file (see
    :func:`image_member`). A write that fails
    part-way or writes no sample raises :class:`ShardWriteError` after removing the shards
    it began (their tar files are closed on the way out and would look whole) and writes no
    manifest; any earlier ``manifest.json`` there is removed when the first shard is begun
    (it no longer describes the folder); a folder the write created is removed again when it
    failed.
    """
    import webdataset as wds
    from tqdm import tqdm

    if "://" in out_pattern or out_pattern.startswith("pipe:"):
        raise ValueError(f"--out {out_pattern!r}: shards are written to a local folder "
                         "(then upload the folder, e.g. with `aws s3 sync`), not to a URL "
                         "or a pipe")
    try:
        first = Path(out_pattern % 0)
    except (TypeError, ValueError):  # no field, two fields, "%%" only, a bad conversion
        raise ValueError(f"--out {out_pattern!r}: needs one shard number field, e.g. "
                         "out/data-%06d.tar") from None
    if first == Path(out_pattern % 1):  # e.g. "%.0s": every shard would overwrite the first
        raise ValueError(f"--out {out_pattern!r}: its field does not number the shards, "
                         "e.g. out/data-%06d.tar")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ValueError(f"--images {images_dir}: " + ("not a folder" if images_dir.exists()
                                                       else "not found"))
    rows = read_caption_table(captions)
    missing = [r["path"] for r in rows if not (images_dir / r["path"]).is_file()]
    if len(missing) == len(rows):  # the wrong folder, not a few lost files
        raise ValueError(f"--images {images_dir}: none of the {len(rows)} image files "
                         f"--captions lists is there (first: {rows[0]['path']}); the "
                         "captions' paths are relative to --images")
    if missing and not skip_missing:
        raise MissingImagesError(missing, images_dir)
    missing_set = set(missing)
    out_dir = first.parent
    old_shards = existing_shards(out_pattern)
    if old_shards and not overwrite:
        # written over, they would mix with the new set: those numbered past its last
        # shard would stay and pass for part of it in a brace pattern or a glob
        raise ValueError(f"--out {out_pattern!r}: {out_dir} already holds "
                         f"{len(old_shards)} shard(s) of this pattern (first: "
                         f"{old_shards[0].name}); remove them, choose another folder, or "
                         "give --overwrite to replace them")
    created = _first_missing(out_dir)  # removed again if the write fails
    _check_writable(out_dir, out_pattern)
    closed: list[str] = []  # the shard files written whole, in order
    written = transcoded = 0
    unreadable: dict[str, int] = {}  # reason -> rows left out
    shown: list[str] = []  # the first 20 of them, named in the warning
    sink = None
    row = None
    try:
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for path in old_shards:  # only with overwrite
            path.unlink(missing_ok=True)
        with wds.ShardWriter(out_pattern, maxcount=maxcount, maxsize=maxsize, verbose=0,
                             post=closed.append) as sink:
            for row in tqdm(rows, desc="writing shards", unit="img", disable=not progress):
                if row["path"] in missing_set:
                    continue
                try:
                    if not row["caption"].strip():
                        raise UnreadableImage("empty_caption", "blank caption")
                    member, data, was_transcoded = image_member(images_dir / row["path"],
                                                                max_pixels)
                except UnreadableImage as err:
                    unreadable[err.reason] = unreadable.get(err.reason, 0) + 1
                    if len(shown) < 20:
                        shown.append(f"{row['path']} ({err})")
                    continue
                transcoded += was_transcoded
                sink.write({"__key__": f"{written:09d}", member: data, "txt": row["caption"],
                            "json": json.dumps({"path": row["path"], "tags": row["tags"]})})
                written += 1
            row = None  # past the rows: a failure now is no image's
        if missing:
            log.warning("skipped %d caption rows whose image is missing", len(missing))
        skipped = sum(unreadable.values())
        if skipped:
            more = f"\n  ... and {skipped - len(shown)} more" if skipped > len(shown) else ""
            log.warning("skipped %d caption rows the reader would skip (a file that is no "
                        "image it can decode, too many pixels, a blank caption):\n  %s%s",
                        skipped, "\n  ".join(shown), more)
        if not written:
            raise ShardWriteError(f"no sample written: none of the {len(rows)} caption rows' "
                                  "files is an image the reader can decode ("
                                  f"{len(missing)} missing, {skipped} unreadable or blank); the "
                                  "empty shard was removed")
        if transcoded:
            log.info("stored %d images of other formats as PNG (the reader takes jpg, png "
                     "and webp)", transcoded)
        manifest = {"shards": [Path(f).name for f in closed], "samples": written,
                    "skipped_missing": len(missing),
                    "skipped_unreadable": unreadable, "transcoded": transcoded,
                    "captions": str(captions), "images": str(images_dir),
                    "members": {"image": "jpg;png;webp", "caption": "txt",
                                "tags": "json:tags"}}
        # whole or not at all: a manifest cut short by a full disk would not parse
        partial = out_dir / "manifest.json.partial"
        partial.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(partial, out_dir / "manifest.json")
    except BaseException as err:
        # the shard open when it failed was closed as a well-formed tar on the way out
        # (ShardWriter.__exit__): it and the whole ones before it would pass for a set
        begun = set(closed) | ({sink.fname} if sink is not None and sink.fname else set())
        for path in [*begun, out_dir / "manifest.json.partial"]:
            Path(path).unlink(missing_ok=True)
        _remove_empty(out_dir, created)
        if isinstance(err, OSError):
            where = f" at image {row['path']}" if row is not None else ""
            raise ShardWriteError(f"writing shards stopped{where}: {type(err).__name__}: "
                                  f"{err}; removed the {len(begun)} shard(s) begun, no "
                                  "manifest written") from err
        raise
    return manifest


def existing_shards(out_pattern: str) -> list[Path]:
    """The files that ``out_pattern`` names for some shard number, sorted: those in its
    folder whose name ``out_pattern % n`` gives for a number ``n``."""
    first = Path(out_pattern % 0)
    if not first.parent.is_dir():
        return []
    name_pattern = Path(out_pattern).name
    field = re.search(r"%[#0\- +]*\d*(?:\.\d+)?([diouxX])", name_pattern.replace("%%", ""))
    if field is None:  # the number is in the folder's name: only this folder's one file
        return [first] if first.is_file() else []
    base = {"x": 16, "X": 16, "o": 8}.get(field.group(1), 10)
    found = []
    for path in first.parent.iterdir():
        digits = re.findall(r"[0-9a-fA-F]+", path.name)
        for candidate in digits:
            try:
                if name_pattern % int(candidate, base) == path.name:
                    found.append(path)
                    break
            except (TypeError, ValueError):
                continue
    return sorted(p for p in found if p.is_file())


def _first_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None: it
    exists): what creating ``folder`` makes."""
    missing = None
    for path in (folder, *folder.parents):
        if path.exists():
            return missing
        missing = path
    return missing


def _remove_empty(folder: Path, created: Path | None) -> None:
    """Remove ``folder`` and its parents up to ``created`` while they are empty (the
    folders a failed write made and left with nothing in them)."""
    if created is None:
        return
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): leave it and what holds it
            return
        if path == created:
            return


def _check_writable(out_dir: Path, out_pattern: str) -> None:
    """Create ``out_dir`` and write a file into it, before any shard: a ``ValueError``
    naming ``--out`` when either fails (a file in the way, no permission, read-only)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_pattern!r}: {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ValueError(f"--out {out_pattern!r}: cannot write into {out_dir} "
                         f"({type(err).__name__}: {err.strerror or err})") from None
