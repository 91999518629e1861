"""Image folder + caption table (CSV / JSONL / Parquet) -> webdataset shards + manifest."""

from __future__ import annotations

import csv
import io
import json
import logging
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


def read_caption_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows ``{"path", "caption", "tags"}`` from a .csv, .jsonl/.json-lines or .parquet file
    with columns ``path``, ``caption`` and optionally ``tags`` (a list, a JSON list string,
    or comma separated text)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".ndjson"):
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip()]
    elif suffix in (".parquet", ".pq"):
        rows = _read_parquet(path)
    else:
        raise ValueError(f"captions file {path}: unknown format {suffix!r}; use .csv, "
                         ".jsonl or .parquet")
    for i, row in enumerate(rows):
        for column in ("path", "caption"):
            if column not in row:
                raise ValueError(f"captions file {path}: row {i} has no {column!r} column "
                                 f"(columns: {sorted(row)})")
    return [{"path": str(r["path"]), "caption": str(r["caption"]),
             "tags": _parse_tags(r.get("tags"))} for r in rows]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    except ImportError:
        raise ValueError(f"captions file {path}: reading Parquet needs pyarrow; install it "
                         "with `pip install pyarrow` (or use CSV/JSONL)") from None


class UnreadableImage(ValueError):
    """A file that is not an image the reader could decode; ``reason`` names why, as the
    reader's skip counts do (``not_an_image``, ``undecodable_image``, ``oversized_image``)."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def image_member(file: Path) -> tuple[str, bytes, bool]:
    """``(member, bytes, transcoded)`` to store for the image ``file``: a jpg/jpeg/png/webp
    file byte for byte under its own member, any other image PIL decodes (bmp, tif, gif,
    ...) as a PNG of its first frame under ``png`` (``transcoded``). Every file is decoded
    once, as the reader does, so a sample is written only if the reader can read it; one
    that cannot be raises :class:`UnreadableImage`."""
    data = file.read_bytes()
    try:
        with warnings.catch_warnings():
            # large but legal images: the reader silences the same warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
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
    except UnidentifiedImageError as err:  # a text file, an empty file, random bytes
        raise UnreadableImage("not_an_image", "no image format PIL knows") from err
    except Image.DecompressionBombError as err:  # beyond twice PIL's limit: so does the reader
        raise UnreadableImage("oversized_image", str(err)) from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types for damaged data
        raise UnreadableImage("undecodable_image", f"{type(err).__name__}: {err}") from err


def write_shards(images_dir: str | Path, captions: str | Path, out_pattern: str,
                 maxcount: int = 10000, maxsize: int = 1_000_000_000,
                 skip_missing: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write one sample per caption row (``jpg|png|webp``, ``txt``, ``json`` with tags and
    the original path) into shards named by ``out_pattern`` (e.g. ``out/data-%06d.tar``);
    write ``manifest.json`` next to them and return it.

    Missing image files raise :class:`MissingImagesError` listing them, unless
    ``skip_missing`` (then they are left out and counted in the manifest). Images in other
    formats are stored as PNG (counted, ``transcoded``); a file that is no image the reader
    could decode is left out, counted by reason (``skipped_unreadable``) and named in a
    warning: that is only known once it is decoded, while writing, unlike a missing file
    (see :func:`image_member`).
    """
    import webdataset as wds
    from tqdm import tqdm

    if "%" not in out_pattern:
        raise ValueError(f"--out {out_pattern!r}: needs a shard number field, e.g. "
                         "out/data-%06d.tar")
    images_dir = Path(images_dir)
    rows = read_caption_table(captions)
    missing = [r["path"] for r in rows if not (images_dir / r["path"]).is_file()]
    if missing and not skip_missing:
        raise MissingImagesError(missing, images_dir)
    missing_set = set(missing)
    out_dir = Path(out_pattern).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    written = transcoded = 0
    unreadable: dict[str, int] = {}  # reason -> rows left out
    shown: list[str] = []  # the first 20 of them, named in the warning
    with wds.ShardWriter(out_pattern, maxcount=maxcount, maxsize=maxsize, verbose=0,
                         post=lambda fname: shards.append(Path(fname).name)) as sink:
        for row in tqdm(rows, desc="writing shards", unit="img", disable=not progress):
            if row["path"] in missing_set:
                continue
            try:
                member, data, was_transcoded = image_member(images_dir / row["path"])
            except UnreadableImage as err:
                unreadable[err.reason] = unreadable.get(err.reason, 0) + 1
                if len(shown) < 20:
                    shown.append(f"{row['path']} ({err})")
                continue
            transcoded += was_transcoded
            sink.write({"__key__": f"{written:09d}", member: data, "txt": row["caption"],
                        "json": json.dumps({"path": row["path"], "tags": row["tags"]})})
            written += 1
    if missing:
        log.warning("skipped %d caption rows whose image is missing", len(missing))
    skipped = sum(unreadable.values())
    if skipped:
        more = f"\n  ... and {skipped - len(shown)} more" if skipped > len(shown) else ""
        log.warning("skipped %d caption rows whose file is not an image the reader can "
                    "decode:\n  %s%s", skipped, "\n  ".join(shown), more)
    if transcoded:
        log.info("stored %d images of other formats as PNG (the reader takes jpg, png and "
                 "webp)", transcoded)
    manifest = {"shards": shards, "samples": written, "skipped_missing": len(missing),
                "skipped_unreadable": unreadable, "transcoded": transcoded,
                "captions": str(captions), "images": str(images_dir),
                "members": {"image": "jpg;png;webp", "caption": "txt", "tags": "json:tags"}}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
