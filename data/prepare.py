"""
Turn raw text into GPT-2 token shards for dstrain, and write the decode-only tokenizer file.

    python3 data/prepare.py                              # WikiText-2 (default)
    python3 data/prepare.py --dataset tinyshakespeare
    python3 data/prepare.py --text a.txt b.txt --name mytext

Every document is preceded by the end-of-text token (llm.c's convention). File formats
(llm.c's, so data prepared by either project works in both):
  shard      int32 header[256] = {20240520, 1, num_tokens, 0...}, then num_tokens uint16
  tokenizer  uint32 header[256] = {20240328, 2, vocab_size, eot_id, 0...}, then for every
             token id: uint8 length, then that many bytes
Needs tiktoken (python3 -m pip install tiktoken) but no network: the GPT-2 BPE files are
read from a local folder when one has them.
"""

import argparse
import glob
import hashlib
import io
import os
import re
import socket
import sys
import time
import urllib.request
import zipfile
from array import array

try:
    import tiktoken
    import tiktoken.load
except ImportError:
    sys.exit("data/prepare.py needs tiktoken: python3 -m pip install tiktoken")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
NETWORK_TIMEOUT = 5  # seconds; an offline machine fails at once and falls through

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
TOKENIZER_MAGIC, TOKENIZER_VERSION = 20240328, 2

# GPT-2's encoding as tiktoken defines it (tiktoken_ext/openai_public.py, "gpt2"): the
# pre-tokenizer pattern, the hashes of the two BPE files, the vocabulary and EOT token.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_VOCAB_SIZE, EOT = 50257, 50256

# WikiText-2 raw: the zip holds wikitext-2-raw/wiki.{train,valid,test}.raw
WIKITEXT_URLS = [
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
]
WIKITEXT_SPLITS = ("train", "valid", "test")
# an article starts at a top-level heading " = Title = "; " = = Section = = " does not
ARTICLE_HEADING = re.compile(r"^ = (?!=).*(?<!=) = $")


# ----------------------------------------------------------------------------
# tokenizer


def gpt2_encoding():
    """GPT-2's tiktoken encoding, built from local BPE files when a folder has them
    ($DSTRAIN_GPT2_DIR, then ../shared/data/gpt2), else from tiktoken's own cache or
    download. Returns (encoding, list of the files it was built from)."""
    folders = [os.environ.get("DSTRAIN_GPT2_DIR"), os.path.join(SHARED_DATA, "gpt2")]
    for folder in filter(None, folders):
        paths = {name: os.path.join(folder, name) for name in GPT2_FILES}
        if not all(os.path.isfile(p) for p in paths.values()):
            continue
        for name, path in paths.items():
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != GPT2_FILES[name]:
                    sys.exit(f"error: {path} is not GPT-2's {name} (its sha256 differs)")
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=paths["vocab.bpe"], encoder_json_file=paths["encoder.json"])
        encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": EOT})
        print(f"tokenizer: GPT-2 BPE from {folder}")
        return encoding, list(paths.values())
    socket.setdefaulttimeout(NETWORK_TIMEOUT)
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:
        sys.exit("error: no GPT-2 BPE files (encoder.json, vocab.bpe) in $DSTRAIN_GPT2_DIR or "
                 f"{os.path.join(SHARED_DATA, 'gpt2')}, and tiktoken cannot fetch them: {e}")
    finally:
        socket.setdefaulttimeout(None)
    print("tokenizer: GPT-2 BPE from tiktoken (its cache or a download)")
    return encoding, []


def write_tokenizer(encoding, path):
    """The decode-only tokenizer file: every token id's bytes, length-prefixed."""
    header = array("I", [0] * 256)
    header[:4] = array("I", [TOKENIZER_MAGIC, TOKENIZER_VERSION, encoding.n_vocab, EOT])
    with open(path + ".tmp", "wb") as f:
        f.write(little_endian(header))
        for token in range(encoding.n_vocab):
            data = encoding.decode_single_token_bytes(token)
            assert len(data) < 256, f"token {token} is {len(data)} bytes long"
            f.write(bytes([len(data)]) + data)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------
# shards


def little_endian(values):
    """The bytes of an array in little-endian order (the file formats' byte order)."""
    if sys.byteorder == "big":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def shard_path(out_dir, name, split, index):
    return os.path.join(out_dir, f"{name}_{split}_{index:06d}.bin")


def split_shards(out_dir, name, split):
    """The shard files of a split that exist now, sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(out_dir), f"{name}_{split}_*.bin")))


def shard_token_count(path):
    """Token count in a shard's header, or None when the file is not a valid shard."""
    header = array("i")
    try:
        with open(path, "rb") as f:
            header.frombytes(f.read(256 * 4))
    except (OSError, ValueError):
        return None
    if sys.byteorder == "big":
        header.byteswap()
    valid = (len(header) == 256 and header[0] == SHARD_MAGIC and header[1] == SHARD_VERSION
             and os.path.getsize(path) == 256 * 4 + 2 * header[2])
    return header[2] if valid else None


def existing_shards(out_dir, name, split, shard_size, inputs):
    """Token counts of a split's shards when they are complete (numbered 0, 1, ...; every
    shard but the last holds shard_size tokens) and newer than every input; else None."""
    paths = split_shards(out_dir, name, split)
    if not paths or paths != [shard_path(out_dir, name, split, i) for i in range(len(paths))]:
        return None
    if inputs and min(map(os.path.getmtime, paths)) <= max(map(os.path.getmtime, inputs)):
        return None
    counts = [shard_token_count(p) for p in paths]
    if None in counts or any(c != shard_size for c in counts[:-1]) or counts[-1] > shard_size:
        return None
    return counts


def write_shards(encoding, documents, out_dir, name, split, shard_size):
    """Tokenize documents (each preceded by EOT) into shards of shard_size tokens, the last
    one shorter. Returns the token counts of the shards written."""
    for stale in split_shards(out_dir, name, split):
        os.remove(stale)
    counts = []
    buffer = array("H")

    def flush(tokens):
        header = array("i", [0] * 256)
        header[:3] = array("i", [SHARD_MAGIC, SHARD_VERSION, len(tokens)])
        path = shard_path(out_dir, name, split, len(counts))
        with open(path + ".tmp", "wb") as f:
            f.write(little_endian(header))
            f.write(little_endian(tokens))
        os.replace(path + ".tmp", path)
        counts.append(len(tokens))

    for document in documents:
        buffer.append(EOT)
        buffer.extend(encoding.encode_ordinary(document))
        while len(buffer) >= shard_size:
            flush(buffer[:shard_size])
            del buffer[:shard_size]
    if buffer:
        flush(buffer)
    return counts


# ----------------------------------------------------------------------------
# datasets: each gives its input files (for the up-to-date check) and, per split, its
# documents as a lazy iterable (read only when the split's shards are written)


def wikitext_articles(path):
    """Yield the articles of a WikiText file, each from its " = Title = " line up to the
    next one; lines before the first title belong to the first article."""
    lines, seen_title = [], False
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            if ARTICLE_HEADING.match(line.rstrip("\r\n")):
                if seen_title:
                    yield "".join(lines)
                    lines = []
                seen_title = True
            lines.append(line)
    if lines:
        yield "".join(lines)


def download_wikitext(raw_dir):
    """Fetch WikiText-2 raw into raw_dir; return (True, where from) or (False, why not)."""
    reasons = []
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=NETWORK_TIMEOUT).close()
            splits = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
            os.makedirs(raw_dir, exist_ok=True)
            for split, hf_split in zip(WIKITEXT_SPLITS, ("train", "validation", "test")):
                with open(os.path.join(raw_dir, f"wiki.{split}.raw"), "w", encoding="utf-8") as f:
                    f.writelines(splits[hf_split]["text"])  # one row per line, "\n" included
            return True, "the Hugging Face hub (datasets: wikitext, wikitext-2-raw-v1)"
        except Exception as e:
            reasons.append(f"datasets.load_dataset: {e}")
    for url in WIKITEXT_URLS:
        try:
            with urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT) as response:
                archive = zipfile.ZipFile(io.BytesIO(response.read()))
            os.makedirs(raw_dir, exist_ok=True)
            for split in WIKITEXT_SPLITS:
                member = f"wikitext-2-raw/wiki.{split}.raw"
                with open(os.path.join(raw_dir, f"wiki.{split}.raw"), "wb") as f:
                    f.write(archive.read(member))
            return True, url
        except Exception as e:
            reasons.append(f"{url}: {e}")
    return False, "; ".join(reasons)


def wikitext_source(out_dir):
    """Find WikiText raw files: an earlier download in <out-dir>/raw, a fresh download,
    $DSTRAIN_DATA_DIR, ../shared/data/wikitext. Returns (folder, splits to use)."""
    raw_dir = os.path.join(out_dir, "raw")

    def has(folder, split):
        return os.path.isfile(os.path.join(folder, f"wiki.{split}.raw"))

    if all(has(raw_dir, s) for s in WIKITEXT_SPLITS):
        print(f"source: {raw_dir} (WikiText-2 raw, downloaded earlier)")
    else:
        downloaded, detail = download_wikitext(raw_dir)
        if downloaded:
            print(f"source: WikiText-2 raw downloaded from {detail}, kept in {raw_dir}")
        else:
            print(f"network: no download ({detail})")
            candidates = [os.environ.get("DSTRAIN_DATA_DIR"), os.path.join(SHARED_DATA, "wikitext")]
            for folder in filter(None, candidates):
                if has(folder, "valid") and (has(folder, "train") or has(folder, "test")):
                    raw_dir = folder
                    break
                print(f"note: {folder} has no wiki.valid.raw with wiki.train.raw or wiki.test.raw")
            else:
                sys.exit("error: no WikiText found: no network, and neither $DSTRAIN_DATA_DIR nor "
                         f"{os.path.join(SHARED_DATA, 'wikitext')} has the raw files")
            print(f"source: {raw_dir} (local)")
    if has(raw_dir, "train"):
        return raw_dir, {"train": "train", "val": "valid"}
    print("no wiki.train.raw: training on the test split, validating on the valid split")
    return raw_dir, {"train": "test", "val": "valid"}


def split_documents(documents, val_fraction):
    """The last val_fraction of the documents (at least one when there are two or more
    and val_fraction > 0) for validation, the rest for training."""
    n_val = round(len(documents) * val_fraction)
    if val_fraction > 0 and len(documents) >= 2:
        n_val = min(max(n_val, 1), len(documents) - 1)
    n_train = len(documents) - n_val
    return {"train": documents[:n_train], "val": documents[n_train:]}


def read_text(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def dataset_splits(args):
    """Resolve the dataset. Returns (name, out_dir, input files, {split: documents})."""
    if args.text:
        name = args.name
        out_dir = args.out_dir or os.path.join(REPO, "data", name)
        print(f"source: {len(args.text)} text file(s), one document each")
        splits = split_documents(args.text, args.val_fraction)
        return name, out_dir, args.text, {
            split: map(read_text, paths) for split, paths in splits.items()}
    name = args.dataset
    out_dir = args.out_dir or os.path.join(REPO, "data", name)
    if name == "tinyshakespeare":
        path = os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found (use --text FILE for your own copy)")
        print(f"source: {path}, documents split at blank lines")
        text = read_text(path)
        # every paragraph keeps its blank line, so the documents join back to the text
        cuts = [0] + [m.end() for m in re.finditer(r"\n\n+", text)] + [len(text)]
        paragraphs = [text[a:b] for a, b in zip(cuts, cuts[1:]) if a < b]
        return name, out_dir, [path], split_documents(paragraphs, args.val_fraction)
    raw_dir, files = wikitext_source(out_dir)
    paths = {split: os.path.join(raw_dir, f"wiki.{f}.raw") for split, f in files.items()}
    return name, out_dir, list(paths.values()), {
        split: wikitext_articles(path) for split, path in paths.items()}


# ----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["wikitext", "tinyshakespeare"], default="wikitext",
                        help="built-in dataset (default: %(default)s)")
    source.add_argument("--text", nargs="+", metavar="FILE",
                        help="UTF-8 text files instead, each one document")
    parser.add_argument("--name", default="text",
                        help="shard name prefix for --text (default: %(default)s)")
    parser.add_argument("--out-dir", help="folder for the shards (default: data/<name>)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of documents, the last ones, for validation with --text "
                             "and tinyshakespeare; WikiText has its own split "
                             "(default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=100_000_000,
                        help="tokens per shard (default: %(default)s)")
    parser.add_argument("--tokenizer-out", default=os.path.join(REPO, "data", "gpt2_tokenizer.bin"),
                        help="tokenizer file to write (default: data/gpt2_tokenizer.bin)")
    parser.add_argument("--force", action="store_true",
                        help="redo outputs that look up to date (needed after changing "
                             "--val-fraction or the --text file list)")
    args = parser.parse_args()
    if args.shard_size <= 0:
        parser.error("--shard-size must be positive")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    for path in args.text or []:
        if not os.path.isfile(path):
            parser.error(f"--text: {path} is not a file")

    t0 = time.time()
    encoding, bpe_files = gpt2_encoding()
    assert encoding.n_vocab == GPT2_VOCAB_SIZE and encoding.eot_token == EOT
    tokenizer_fresh = (os.path.isfile(args.tokenizer_out) and not args.force and all(
        os.path.getmtime(args.tokenizer_out) > os.path.getmtime(p) for p in bpe_files))
    if tokenizer_fresh:
        print(f"tokenizer: {args.tokenizer_out} is up to date")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.tokenizer_out)), exist_ok=True)
        write_tokenizer(encoding, args.tokenizer_out)
        print(f"tokenizer: wrote {args.tokenizer_out}")

    name, out_dir, inputs, splits = dataset_splits(args)
    os.makedirs(out_dir, exist_ok=True)
    for split, documents in splits.items():
        counts = None if args.force else existing_shards(out_dir, name, split, args.shard_size,
                                                         inputs)
        if counts is not None:
            status = "up to date"
        else:
            counts = write_shards(encoding, documents, out_dir, name, split, args.shard_size)
            status = "written"
        print(f"{split}: {sum(counts):,} tokens in {len(counts)} shard(s), {status}")
        for i in range(len(counts)):
            print(f"  {shard_path(out_dir, name, split, i)}")
        if not counts:
            print(f"warning: the {split} split has no documents")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
