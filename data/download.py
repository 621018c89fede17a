"""
Downloads for data/prepare.py: a file over HTTP into place, resumed with a Range request
when the connection breaks and checked against its size and sha256, with a progress bar
on stderr; and the WikiText raw files from their mirrors (the original zip, else the
Hugging Face parquet files). No tokenization here: prepare.py turns what this fetches
into token shards. More in data/README.md ("Sources and checksums").
"""

import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile

NETWORK_TIMEOUT = 10  # seconds without a byte before a connection counts as broken
DOWNLOAD_ATTEMPTS = 4  # per file: the first try and three resumes
RETRY_WAIT = 2.0  # seconds before a resume (tests set 0)

# WikiText raw. Each zip holds <folder>/wiki.{train,valid,test}.raw. The sha256 of the
# zips are the ones that Apple's mlx-data (python/mlx/data/datasets/wikitext.py) and
# JuliaText's CorpusLoaders.jl check for the same files; the WikiText-103 size is the one
# recorded with them. The Hugging Face copy (dataset Salesforce/wikitext) is parquet,
# one row per line; its sha256 come from the hub's file listing at download time.
WIKITEXT = {
    "wikitext": {
        "title": "WikiText-2 raw",
        "zip": "wikitext-2-raw-v1.zip",
        "folder": "wikitext-2-raw",
        "sha256": "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11",
        "size": None,
        "hf_config": "wikitext-2-raw-v1",
    },
    "wikitext-103": {
        "title": "WikiText-103 raw",
        "zip": "wikitext-103-raw-v1.zip",
        "folder": "wikitext-103-raw",
        "sha256": "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794",
        "size": 191_984_949,
        "hf_config": "wikitext-103-raw-v1",
    },
}
WIKITEXT_MIRRORS = [
    "https://wikitext.smerity.com/",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/",
]
HF_API = "https://huggingface.co/api/datasets/Salesforce/wikitext/tree/main/{config}"
HF_FILE = "https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/{config}/{name}"
WIKITEXT_SPLITS = ("train", "valid", "test")
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

# ----------------------------------------------------------------------------
# progress


class Progress:
    """A progress line on stderr: label, amount done of the total, a bar, MB/s, ETA and an
    optional extra rate (prepare.py's tokenization shows its tokens/s with it). Redrawn in place at most 5 times a second on a terminal; elsewhere
    (logs, CI) a new line every 10 seconds."""

    def __init__(self, label, total_bytes=None, done_bytes=0):
        self.label, self.total, self.done = label, total_bytes, done_bytes
        self.start_done = done_bytes
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def update(self, nbytes, extra=""):
        self.done += nbytes
        now = time.time()
        if now - self.last >= (0.2 if self.tty else 10.0):
            self.last = now
            self.draw(extra)

    def line(self, extra=""):
        seconds = max(time.time() - self.t0, 1e-9)
        rate = (self.done - self.start_done) / seconds
        text = f"{self.label}: {self.done / 1e6:,.1f}"
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            bar = "#" * int(fraction * 20)
            text += f"/{self.total / 1e6:,.1f} MB {fraction:4.0%} [{bar:<20}]"
        else:
            text += " MB"
        text += f" {rate / 1e6:,.1f} MB/s"
        if extra:
            text += f" {extra}"
        if self.total and rate > 0:
            eta = max(self.total - self.done, 0) / rate
            text += f" ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        return text

    def draw(self, extra=""):
        if self.tty:
            sys.stderr.write("\r" + self.line(extra) + "\033[K")
        else:
            sys.stderr.write(self.line(extra) + "\n")
        sys.stderr.flush()
        self.drawn = True

    def close(self, extra=""):
        """Draws the final state (only where a line was drawn before) and ends the line."""
        if self.drawn:
            self.draw(extra)
            if self.tty:
                sys.stderr.write("\n")


# ----------------------------------------------------------------------------
# download


class DownloadError(Exception):
    pass


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path, sha256=None, size=None, attempts=None, timeout=None):
    """Fetch url into path. The bytes go to path + ".part" first; a .part left by an
    earlier run or a broken connection is resumed with an HTTP Range request (up to
    `attempts` tries in all). A progress bar goes to stderr. When the transfer is
    complete, its size and sha256 are checked against the given values: a file that
    differs is deleted (resuming cannot repair it) and DownloadError says so; a file that
    matches is renamed to path."""
    attempts = attempts or DOWNLOAD_ATTEMPTS
    timeout = timeout or NETWORK_TIMEOUT
    part = path + ".part"
    label = os.path.basename(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    error = None
    for attempt in range(attempts):
        if attempt:
            print(f"{label}: {error}; resuming (try {attempt + 1} of {attempts})", file=sys.stderr)
            time.sleep(RETRY_WAIT)
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if size is not None and have > size:
            os.remove(part)
            have = 0
        if size is not None and have == size:
            break  # complete: checked below
        request = urllib.request.Request(url, headers={"User-Agent": "dstrain-data-prepare"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = response_total(response, have)
                if have and response.status != 206:
                    have = 0  # the server sent the whole file: start over
                with open(part, "ab" if have else "wb") as f:
                    progress = Progress(label, total, have)
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        progress.update(len(chunk))
                    progress.close()
            got = os.path.getsize(part)
            if total is not None and got < total:
                # http.client returns b"" when the server closes early, not an error
                error = f"connection closed after {got:,} of {total:,} bytes"
                continue
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                break  # nothing after the bytes we have: the .part is complete
            if e.code in (401, 403, 404, 410):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
            if have == 0 and not os.path.exists(part) and isinstance(e, urllib.error.URLError):
                raise DownloadError(f"{url}: {e.reason}") from None  # no connection at all
            error = f"{type(e).__name__}: {e}"
    else:
        raise DownloadError(f"{url}: {error} ({attempts} tries; {part} is kept, the next "
                            "run resumes it)")
    got = os.path.getsize(part)
    if size is not None and got != size:
        os.remove(part)
        raise DownloadError(f"{url}: {got:,} bytes, expected {size:,}; deleted {part}")
    if sha256 is not None:
        digest = sha256_file(part)
        if digest != sha256:
            os.remove(part)
            raise DownloadError(f"{url}: sha256 {digest}, expected {sha256} (corrupt or "
                                f"not the published file); deleted {part}")
    os.replace(part, path)


def response_total(response, have):
    """The whole file's size from a response's Content-Range or Content-Length, or None."""
    content_range = response.headers.get("Content-Range")
    if response.status == 206 and content_range:
        match = re.match(r"bytes (\d+)-\d+/(\d+)", content_range)
        if not match or int(match.group(1)) != have:
            raise DownloadError(f"unexpected Content-Range {content_range!r} for bytes={have}-")
        return int(match.group(2))
    length = response.headers.get("Content-Length")
    return int(length) if length is not None else None


# ----------------------------------------------------------------------------
# WikiText


def fetch_wikitext(dataset, raw_dir):
    """WikiText's wiki.{train,valid,test}.raw into raw_dir, from the original zip, else
    from the Hugging Face copy. Returns where they came from; a DownloadError gives every
    source's reason."""
    reasons = []
    for fetch in (download_wikitext_zip, download_wikitext_parquet):
        try:
            return fetch(WIKITEXT[dataset], raw_dir)
        except DownloadError as e:
            reasons.append(str(e))
    raise DownloadError("; ".join(reasons))


def download_wikitext_zip(info, raw_dir):
    """The original zip (downloaded, or put into raw_dir by hand), checked against its
    published sha256 and unpacked into raw_dir (zipfile also checks every member's CRC-32
    as it reads). Returns where it came from."""
    zip_path = os.path.join(raw_dir, info["zip"])
    if os.path.isfile(zip_path):
        digest = sha256_file(zip_path)
        if digest != info["sha256"]:
            raise DownloadError(f"{zip_path}: sha256 {digest}, expected {info['sha256']}")
        where = f"{zip_path} (found there, sha256 ok)"
    else:
        reasons = []
        for mirror in WIKITEXT_MIRRORS:
            try:
                download(mirror + info["zip"], zip_path, info["sha256"], info["size"])
                break
            except DownloadError as e:
                reasons.append(str(e))
        else:
            raise DownloadError("; ".join(reasons))
        where = f"{mirror}{info['zip']} (sha256 ok), kept in {raw_dir}"
    with zipfile.ZipFile(zip_path) as archive:
        for split in WIKITEXT_SPLITS:
            target = os.path.join(raw_dir, f"wiki.{split}.raw")
            with archive.open(f"{info['folder']}/wiki.{split}.raw") as src, \
                    open(target + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(target + ".tmp", target)
    return where


def hf_parquet_files(config):
    """(name, size, sha256 or None) of each parquet file of a config, from the hub's
    listing; the sha256 is the file's Git LFS object id, which the hub computes."""
    url = HF_API.format(config=config)
    try:
        with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT) as response:
            entries = json.load(response)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(f"{url}: {e}") from None
    files = [(os.path.basename(e["path"]), e.get("size"), (e.get("lfs") or {}).get("oid"))
             for e in entries if e.get("path", "").endswith(".parquet")]
    if not files:
        raise DownloadError(f"{url}: no parquet files listed")
    return sorted(files)


def download_wikitext_parquet(info, raw_dir):
    """The Hugging Face copy (parquet, needs pyarrow), each file checked against the
    sha256 the hub lists, rows written out as the raw files. Returns where it came from."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DownloadError("the Hugging Face copy is parquet, which needs pyarrow "
                            "(python3 -m pip install pyarrow)") from None
    config = info["hf_config"]
    files = hf_parquet_files(config)
    for name, size, sha256 in files:
        path = os.path.join(raw_dir, config + "-" + name)
        if not os.path.isfile(path):
            if sha256 is None:
                print(f"note: the hub lists no sha256 for {name}; checking its size only")
            download(HF_FILE.format(config=config, name=name), path, sha256, size)
    for split, hf_split in HF_SPLITS.items():
        names = [name for name, _, _ in files if name.startswith(hf_split + "-")]
        if not names:
            raise DownloadError(f"{HF_API.format(config=config)}: no {hf_split} files")
        target = os.path.join(raw_dir, f"wiki.{split}.raw")
        with open(target + ".tmp", "w", encoding="utf-8", newline="") as out:
            for name in names:
                # a row is a line, "\n" included, except that the hub's rows hold blank
                # lines as "": in WikiText every blank line is " \n", which this restores
                parquet = pq.ParquetFile(os.path.join(raw_dir, config + "-" + name))
                for batch in parquet.iter_batches(columns=["text"]):
                    out.writelines(row or " \n" for row in batch.column(0).to_pylist())
        os.replace(target + ".tmp", target)
    return f"the Hugging Face hub (Salesforce/wikitext, {config}, sha256 checked), kept in {raw_dir}"

