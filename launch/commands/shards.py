"""`internimage shards demo|write|verify|tags`: build and check webdataset shards, and
build a tag vocabulary from them.

Thin: argument parsing and printing; the work is in data/ (shard I/O) and pretrain/data/
(the recipe).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub, name: str) -> None:
    """Add ``shards`` and its actions to the ``internimage`` parser."""
    p = sub.add_parser(name, help="write and verify webdataset shards",
                       description="Shard tools: built-in demo data, image folders to "
                       "shards, verification through the training decode path.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    demo = actions.add_parser("demo", help="write the built-in digits demo shards",
                              description="scikit-learn's 1,797 handwritten digit scans as "
                              "image/caption/tag shards with a held-out val shard.")
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--image-size", type=int, default=32, help="JPEG side in pixels")
    demo.add_argument("--maxcount", type=int, default=256, help="samples per train shard")
    demo.set_defaults(func=run_demo)

    write = actions.add_parser("write", help="image folder + captions table -> shards")
    write.add_argument("--images", required=True, help="folder the caption paths are under")
    write.add_argument("--captions", required=True,
                       help="CSV, JSONL or Parquet with columns path, caption[, tags]")
    write.add_argument("--out", required=True, help="shard pattern, e.g. out/data-%%06d.tar")
    write.add_argument("--maxcount", type=int, default=10000, help="samples per shard")
    write.add_argument("--maxsize", type=int, default=1_000_000_000, help="bytes per shard")
    write.add_argument("--skip-missing", action="store_true",
                       help="skip rows whose image file is missing (else: error)")
    write.add_argument("--overwrite", action="store_true",
                       help="remove the output folder's shards of this pattern first "
                       "(else: refused)")
    write.add_argument("--max-image-pixels", type=int, default=None,
                       help="leave out images with more pixels (default: the reader's "
                       "data.max_image_pixels default, PIL's limit)")
    write.set_defaults(func=run_write)

    verify = actions.add_parser("verify", help="decode every sample, print a JSON tally",
                                description="Reads every sample through the training decode "
                                "path; prints one JSON line last. Exit 0 unless nothing "
                                "could be read.")
    verify.add_argument("urls", nargs="+", help="shard URLs or brace patterns or .txt lists")
    verify.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    verify.add_argument("--image-key", default="jpg;png;webp")
    verify.add_argument("--text-key", default="txt", help="'' for image-only shards")
    verify.add_argument("--tags-key", default="json:tags", help="'' for none")
    verify.add_argument("--image-size", type=int, default=64)
    verify.set_defaults(func=run_verify)

    tags = actions.add_parser("tags", help="build a tag vocabulary from the shards' tags",
                              description="Streams the shards once, counts the tags of "
                              "each sample (the data config's tags_key), writes the N most "
                              "frequent one per line (the format of data.tag_vocab) and "
                              "prints counts and coverage: the fraction of tagged samples "
                              "with at least one tag in the vocabulary. Last stdout line: "
                              "JSON.")
    tags.add_argument("urls", nargs="+", help="shard URLs or brace patterns or .txt lists")
    tags.add_argument("--top", type=int, required=True, help="vocabulary size N")
    tags.add_argument("--out", required=True, help="vocabulary file to write")
    tags.add_argument("--tags-key", default="json:tags",
                      help="'ext:field' (a JSON member's list) or 'ext' (comma separated)")
    tags.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint")
    tags.add_argument("--show", type=int, default=20, help="print the first N counts")
    tags.set_defaults(func=run_tags)


def run_demo(args: argparse.Namespace) -> int:
    """Write the digits demo shards and print the manifest path and counts."""
    from data.demo import write_demo_shards

    out = Path(args.out)
    clash = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if clash is not None:  # was FileExistsError's traceback
        print(f"internimage shards demo: --out {args.out}: {clash} is a file, not a "
              "directory: give a directory for the shards", file=sys.stderr)
        return 2
    manifest = write_demo_shards(out, image_size=args.image_size, maxcount=args.maxcount)
    splits = json.loads(manifest.read_text())["splits"]
    for split, info in splits.items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
    print(manifest)
    return 0


def run_write(args: argparse.Namespace) -> int:
    """Write shards from an image folder and a captions table. Bad input (a flag's path
    that cannot be used, missing images): its message on stderr, exit status 2, nothing
    written; a write that failed part-way or wrote no sample: its message, exit status 1,
    the shards it began removed and no manifest."""
    from data.shard_writer import MissingImagesError, ShardWriteError, write_shards

    for flag, value in (("--maxcount", args.maxcount), ("--maxsize", args.maxsize),
                        ("--max-image-pixels", args.max_image_pixels)):
        if value is not None and value < 1:
            print(f"internimage shards write: {flag} must be >= 1, got {value}",
                  file=sys.stderr)
            return 2
    pixels = {} if args.max_image_pixels is None else {"max_pixels": args.max_image_pixels}
    try:
        manifest = write_shards(args.images, args.captions, args.out, maxcount=args.maxcount,
                                maxsize=args.maxsize, skip_missing=args.skip_missing,
                                overwrite=args.overwrite, **pixels)
    except (MissingImagesError, ValueError) as err:  # refused before anything was written
        print(f"internimage shards write: {err}", file=sys.stderr)
        return 2
    except ShardWriteError as err:
        print(f"internimage shards write: {err}", file=sys.stderr)
        return 1
    unreadable = sum(manifest.get("skipped_unreadable", {}).values())
    print(f"wrote {manifest['samples']} samples in {len(manifest['shards'])} shard(s); "
          f"skipped {manifest['skipped_missing']} with missing images, {unreadable} not "
          f"decodable as images; {manifest.get('transcoded', 0)} transcoded to PNG")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """Decode every sample; the last stdout line is the JSON tally. A ``.txt`` list that
    cannot be read or used as one: its message on stderr, exit status 2."""
    from data.config import S3Config
    from data.sources import ShardListError
    from pretrain.data.verify import verify_shards

    try:
        report = verify_shards(args.urls, S3Config(endpoint_url=args.endpoint_url),
                               image_key=args.image_key, text_key=args.text_key or None,
                               tags_key=args.tags_key or None, image_size=args.image_size)
    except (ShardListError, OSError) as err:  # a .txt list unusable, missing or unreadable
        print(f"internimage shards verify: {_list_error(err)}", file=sys.stderr)
        return 2
    print(json.dumps(report, sort_keys=True))
    return 0 if report["samples"] > 0 else 1


def _list_error(err: Exception) -> str:
    """A shard list that could not be used, in one line: a refusal's own message, or a
    read error's type and message (credentials in a URL removed)."""
    from data.sources import ShardListError
    from runtime.redact import redact_url

    if isinstance(err, ShardListError):
        return str(err)
    return f"a shard list could not be read ({type(err).__name__}: {redact_url(str(err))})"


def run_tags(args: argparse.Namespace) -> int:
    """Count tags, write the top-N vocabulary, print counts and coverage. A ``.txt`` list
    that cannot be read or used as one: its message on stderr, exit status 2; a shard that
    could not be read whole: its message on stderr, exit status 1, no vocabulary written."""
    from data.config import S3Config
    from data.sources import ShardListError, ShardReadError, expand_urls
    from data.tags import count_tags, top_tags, write_vocab

    if args.top < 1:
        print(f"internimage shards tags: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    s3 = S3Config(endpoint_url=args.endpoint_url)
    try:
        urls = expand_urls(args.urls, s3)
    except (ShardListError, OSError) as err:  # a .txt list unusable, missing or unreadable
        print(f"internimage shards tags: {_list_error(err)}", file=sys.stderr)
        return 2
    try:
        counts = count_tags(urls, args.tags_key, s3)
    except ShardReadError as err:  # a shard read only in part: a vocabulary of part of it
        print(f"internimage shards tags: {err}", file=sys.stderr)
        return 1
    vocab = top_tags(counts.tags, args.top)
    path = write_vocab(vocab, args.out)
    for tag in vocab[:args.show]:
        print(f"{counts.tags[tag]}\t{tag}")
    report = {"samples": counts.samples, "tagged": counts.tagged,
              "malformed_tags": counts.malformed, "distinct_tags": len(counts.tags),
              "vocab": len(vocab), "coverage": round(counts.coverage(vocab), 6),
              "shard_skips": counts.shard_skips, "out": str(path)}
    print(json.dumps(report, sort_keys=True))
    return 0 if counts.tagged > 0 else 1
