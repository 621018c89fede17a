"""
Turn raw text into token shards for dstrain, and write the decode-only tokenizer file.

    python3 data/prepare.py                              # WikiText-2 raw (default)
    python3 data/prepare.py --dataset wikitext-103       # WikiText-103 raw (540 MB of text)
    python3 data/prepare.py --dataset tinyshakespeare
    python3 data/prepare.py --text a.txt b.txt --name mytext
    python3 data/prepare.py --dir corpus/                # every .txt file under corpus/
    python3 data/prepare.py --tokenizer models/deepseek-llm-7b-base   # the model's tokenizer

Tokens are GPT-2's (tiktoken), each document preceded by the end-of-text token (llm.c's
convention), or with --tokenizer DIR those of the model's DIR/tokenizer.json (Hugging
Face's `tokenizers`), each document as AutoTokenizer.from_pretrained(DIR)(text) gives
it, starting with the model's BOS. Outputs: data/<name>/<name>_{train,val}_NNNNNN.bin
and data/gpt2_tokenizer.bin; with --tokenizer the name gets the tokenizer's (the
folder's) name: data/<name>-<tok>/<name>-<tok>_train_000000.bin ... and
data/<tok>_tokenizer.bin. WikiText is split into documents at its article headings
(" = Title = " lines). Tokenization uses every core (a pool of worker processes,
--workers to change) and gives the same shards for any number of workers. File formats
(llm.c's, so data prepared by either project works in both):
  shard      int32 header[256] = {20240520, 1, num_tokens, 0...}, then num_tokens uint16
             (vocabularies up to 65,536), or {20240801, 7, num_tokens, 0...}, then uint32
  tokenizer  uint32 header[256] = {20240328, 2, vocab_size, start_id, 0...}, then for
             every token id: uint8 length 1..255 and that many bytes, or (empty tokens,
             longer ones) a 0 byte, a uint32 length and the bytes. start_id (llm.c's
             "EOT") is the token every document starts with.
WikiText downloads: the original zip (sha256 checked), else the Hugging Face parquet
files (sha256 from the hub; needs pyarrow); resumed when broken. Without a network,
WikiText comes from local raw files. Needs tiktoken (python3 -m pip install tiktoken),
or with --tokenizer the tokenizers package. More in data/README.md.
"""

import argparse
import glob
import json
import mmap
import multiprocessing
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
from array import array
from collections import deque
from concurrent.futures import ProcessPoolExecutor

try:
    import tiktoken
except ImportError:
    tiktoken = None  # needed for GPT-2 only; gpt2_encoding says so

import download  # data/download.py: checksums, mirrors, resume, progress bar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # uint16 tokens
SHARD32_MAGIC, SHARD32_VERSION = 20240801, 7  # uint32 tokens
SHARD_FORMATS = {2: (SHARD_MAGIC, SHARD_VERSION, "H"), 4: (SHARD32_MAGIC, SHARD32_VERSION, "I")}
TOKENIZER_MAGIC, TOKENIZER_VERSION = 20240328, 2
MAX_VOCAB_SIZE = 1 << 24  # dstrain.h's limit
assert array("H").itemsize == 2 and array("I").itemsize == 4

# GPT-2's encoding as tiktoken defines it (tiktoken_ext/openai_public.py, "gpt2"): the
# pre-tokenizer pattern, the hashes of the two BPE files, the vocabulary and EOT token.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_VOCAB_SIZE, EOT = 50257, 50256

# an article starts at a title line " = Title = " between blank lines (see
# article_starts); a section heading " = = Section = = " does not start one
ARTICLE_TITLE = re.compile(rb"^ = (?!=).*(?<!=) = \r?$")

# The tokenizer pool works on tasks of about TASK_BYTES bytes of text: byte ranges of the
# input files, which the workers read themselves. A longer document is cut into pieces,
# each cut made before a space that a printable ASCII character follows: GPT-2's
# pre-tokenizer always starts a new piece there (the space goes with the word after it,
# and a run of whitespace before it ends just before it), so the tokens of the pieces,
# concatenated, are the tokens of the document. (In UTF-8 these two bytes are always
# those characters, never part of a longer one.)
TASK_BYTES = 1 << 20
SAFE_CUT = re.compile(rb" (?=[!-~])")

# ----------------------------------------------------------------------------
# tokenizer


def gpt2_encoding():
    """GPT-2's tiktoken encoding, built from local BPE files when a folder has them
    ($DSTRAIN_GPT2_DIR, then ../shared/data/gpt2), else from tiktoken's own cache or
    download. Returns (encoding, list of the files it was built from)."""
    folders = [os.environ.get("DSTRAIN_GPT2_DIR"), os.path.join(SHARED_DATA, "gpt2")]
    if tiktoken is None:
        sys.exit("error: GPT-2's tokens need tiktoken: python3 -m pip install tiktoken (or "
                 "give --tokenizer DIR)")
    for folder in filter(None, folders):
        paths = {name: os.path.join(folder, name) for name in GPT2_FILES}
        if not all(os.path.isfile(p) for p in paths.values()):
            continue
        for name, path in paths.items():
            if download.sha256_file(path) != GPT2_FILES[name]:
                sys.exit(f"error: {path} is not GPT-2's {name} (its sha256 differs)")
        ranks = gpt2_ranks(paths["encoder.json"])
        encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": EOT})
        print(f"tokenizer: GPT-2 BPE from {folder}")
        return encoding, list(paths.values())
    socket.setdefaulttimeout(download.NETWORK_TIMEOUT)
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as e:
        sys.exit("error: no GPT-2 BPE files (encoder.json, vocab.bpe) in $DSTRAIN_GPT2_DIR or "
                 f"{os.path.join(SHARED_DATA, 'gpt2')}, and tiktoken cannot fetch them: {e}")
    finally:
        socket.setdefaulttimeout(None)
    print("tokenizer: GPT-2 BPE from tiktoken (its cache or a download)")
    return encoding, []


def gpt2_ranks(encoder_json):
    """tiktoken's mergeable ranks (token bytes -> id) from GPT-2's encoder.json, which
    lists every token with its id; the id is the token's BPE rank (vocab.bpe lists the
    merges in the same order). The file spells bytes as characters (byte_level_bytes)."""
    byte_of = byte_level_bytes()
    with open(encoder_json, encoding="utf-8") as f:
        ids = json.load(f)
    return {bytes(byte_of[c] for c in token): i for token, i in ids.items() if i != EOT}


def byte_level_bytes():
    """GPT-2's byte-level alphabet, as a dict character -> byte: so that no token holds
    a space or a control character, a byte that prints (other than space) is its own
    character, the other 68 bytes, in order, are chr(256), chr(257), ... Byte-level BPE
    tokenizers (GPT-2's encoder.json, the ByteLevel pre-tokenizer and decoder of
    Hugging Face's tokenizers, DeepSeek's) spell their tokens with it."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def write_tokenizer_file(path, tokens, start):
    """The decode-only tokenizer file: the bytes of every token id, length-prefixed (a
    uint8 length 1..255, or a 0 byte and a uint32 length for an empty token or a longer
    one), with `start` (the document start token) in the header's EOT field. Written
    under a temporary name, then renamed."""
    header = array("I", [0] * 256)
    header[:4] = array("I", [TOKENIZER_MAGIC, TOKENIZER_VERSION, len(tokens), start])
    with open(path + ".tmp", "wb") as f:
        f.write(little_endian(header))
        for data in tokens:
            if 1 <= len(data) <= 255:
                f.write(bytes([len(data)]) + data)
            else:
                f.write(b"\0" + struct.pack("<I", len(data)) + data)
    os.replace(path + ".tmp", path)


def write_tokenizer(encoding, path):
    """GPT-2's decode-only tokenizer file (every token 1..255 bytes: llm.c's format)."""
    tokens = [encoding.decode_single_token_bytes(t) for t in range(encoding.n_vocab)]
    write_tokenizer_file(path, tokens, EOT)


class GPT2Tokenizer:
    """GPT-2's tokens through tiktoken: <|endoftext|> before every document, the text
    encoded as ordinary text (a literal "<|endoftext|>" in it is not the EOT token),
    uint16. A long document may be cut at SAFE_CUT: its pieces' tokens are the whole's."""
    name = "gpt2"
    token_bytes = 2
    cuts_documents = True

    def __init__(self, encoding):
        self.encoding = encoding
        self.start = struct.pack("<H", EOT)

    def encode(self, texts, starts):
        """Little-endian token bytes of the segments `texts`; starts[i]: texts[i] starts
        a document."""
        parts = []
        for text, starts_document in zip(texts, starts):
            if starts_document:
                parts.append(self.start)
            tokens = array("H")
            tokens.fromlist(self.encoding.encode_ordinary(text))  # twice as fast as extend
            parts.append(little_endian(tokens))
        return b"".join(parts)


class HFTokenizer:
    """A model's own tokenizer: DIR/tokenizer.json through Hugging Face's `tokenizers`,
    with BOS/EOS as transformers adds them (see hf_tokenizer). Documents are never cut
    (the pieces of a cut document would get a BOS each). uint16 tokens when the
    vocabulary (added tokens included) fits, uint32 otherwise."""
    cuts_documents = False

    def __init__(self, tokenizer, name, start, prepend, vocab_size):
        self.tokenizer, self.name, self.start, self.prepend = tokenizer, name, start, prepend
        self.vocab_size = vocab_size
        self.token_bytes = 2 if vocab_size <= 1 << 16 else 4
        self.typecode = SHARD_FORMATS[self.token_bytes][2]

    def encode(self, texts, starts):
        assert all(starts), "HFTokenizer's documents are never cut"
        tokens = array(self.typecode)
        # encode_batch: tokenizers' own threads in a single process; in a pool of worker
        # processes TOKENIZERS_PARALLELISM=false keeps each worker on one thread
        for encoding in self.tokenizer.encode_batch(texts):  # add_special_tokens=True
            if self.prepend:
                tokens.append(self.start)
            tokens.fromlist(encoding.ids)
        return little_endian(tokens)


def read_json(path, what):
    """A JSON file as a dict, or {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: cannot read {what}: {e}")
    if not isinstance(value, dict):
        sys.exit(f"error: {path}: {what} must be a JSON object")
    return value


def special_token(folder, configs, key, tokenizer):
    """(string, id) of a special token (bos_token, eos_token) as transformers finds it:
    tokenizer_config.json, else special_tokens_map.json; a string or a {"content": ...}
    dict. (None, None) when neither names it."""
    for file, config in configs:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            sys.exit(f"error: {os.path.join(folder, file)}: {key} must be a string or an "
                     f"object with a \"content\" string, got {config[key]!r}")
        token_id = tokenizer.token_to_id(value)
        if token_id is None:
            sys.exit(f"error: {os.path.join(folder, file)}: {key} {value!r} is not a token of "
                     f"{os.path.join(folder, 'tokenizer.json')}")
        return value, token_id
    return None, None


# transformers 4's tokenizer classes whose fast tokenizer replaces tokenizer.json's
# post-processor with "BOS $A EOS" from add_bos_token / add_eos_token (its
# update_post_processor), with their defaults; other classes keep the post-processor
BOS_EOS_FROM_CONFIG = {"LlamaTokenizer": (True, False), "CodeLlamaTokenizer": (True, False),
                       "GemmaTokenizer": (True, False), "CohereTokenizer": (True, False),
                       "GPTNeoXTokenizer": (False, False)}


def bos_eos_rule(tokenizer, folder, config, bos, eos):
    """Sets the post-processor as transformers 4's AutoTokenizer would have it; returns
    what decided. A tokenizer_config.json without tokenizer_class but with add_bos_token
    or add_eos_token counts as LLaMA's. (transformers 5 ignores both keys when there is a
    tokenizer.json and keeps its post-processor: the two agree for tokenizers saved by
    transformers, whose tokenizer.json already has "BOS $A EOS"; hf_tokenizer says so
    where they differ.)"""
    import tokenizers
    path = os.path.join(folder, "tokenizer_config.json")
    cls = config.get("tokenizer_class")
    family = cls[:-4] if isinstance(cls, str) and cls.endswith("Fast") else cls
    if family not in BOS_EOS_FROM_CONFIG and not (
            cls is None and ("add_bos_token" in config or "add_eos_token" in config)):
        return "tokenizer.json's post-processor"
    defaults = BOS_EOS_FROM_CONFIG.get(family, BOS_EOS_FROM_CONFIG["LlamaTokenizer"])
    add_bos = config.get("add_bos_token", defaults[0])
    add_eos = config.get("add_eos_token", defaults[1])
    for key, value, token in (("bos_token", add_bos, bos), ("eos_token", add_eos, eos)):
        if not isinstance(value, bool):
            sys.exit(f"error: {path}: add_{key} must be true or false, got {value!r}")
        if value and token[0] is None:
            sys.exit(f"error: {path}: add_{key} is true but no {key} is given")
    a = ([f"{bos[0]}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos[0]}:0"] if add_eos else [])
    b = ([f"{bos[0]}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos[0]}:1"] if add_eos else [])
    special = dict(t for t, used in ((bos, add_bos), (eos, add_eos)) if used)
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=" ".join(a), pair=" ".join(a + b), special_tokens=list(special.items()))
    return (f"add_bos_token {str(add_bos).lower()}, add_eos_token {str(add_eos).lower()} "
            f"({cls or 'LLaMA'}'s, tokenizer_config.json)")


def hf_tokenizer(folder, name=None):
    """The model's tokenizer in `folder`, as AutoTokenizer.from_pretrained(folder) encodes
    a document (transformers 4): tokenizer.json's normalizer, pre-tokenizer, model and
    added tokens (special tokens written in the text are those tokens), then BOS/EOS as
    bos_eos_rule finds them: tokenizer_config.json's add_bos_token / add_eos_token for
    LLaMA's, DeepSeek's (LlamaTokenizerFast) and a few other tokenizer classes, else
    tokenizer.json's post-processor. Every document must start with a token that marks
    it (the one samples start from): the BOS (bos_token; without one, the first token
    the post-processor adds if it is special, else eos_token, as GPT-2's tokenizer uses
    <|endoftext|>). When the tokenizer does not add it itself, it is put in front of
    every document, and this says so. Returns an HFTokenizer; `name` (default: the
    folder's name) names the outputs."""
    try:
        import tokenizers
    except ImportError:
        sys.exit("error: --tokenizer needs Hugging Face's tokenizers: python3 -m pip install "
                 "tokenizers")
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        sys.exit(f"error: --tokenizer: {path} not found (a Hugging Face model folder has it)")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:
        sys.exit(f"error: {path}: tokenizers cannot read it: {e}")
    configs = [(f, read_json(os.path.join(folder, f), "the tokenizer's configuration"))
               for f in ("tokenizer_config.json", "special_tokens_map.json")]
    bos = special_token(folder, configs, "bos_token", tokenizer)
    eos = special_token(folder, configs, "eos_token", tokenizer)
    own = tokenizer.encode("a").ids  # with tokenizer.json's post-processor (transformers 5)
    rule = bos_eos_rule(tokenizer, folder, configs[0][1], bos, eos)
    probe = tokenizer.encode("a")  # what the post-processor adds around a document
    start = bos[1]
    if start is None and probe.ids and probe.special_tokens_mask[0]:
        start = probe.ids[0]
    if start is None:
        start = eos[1]
    if start is None:
        sys.exit(f"error: {folder}: no bos_token or eos_token (tokenizer_config.json, "
                 "special_tokens_map.json) and the post-processor adds no special token first: "
                 "nothing marks where a document starts")
    prepend = not (probe.ids and probe.ids[0] == start)
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if vocab_size > MAX_VOCAB_SIZE:
        sys.exit(f"error: {path}: token ids up to {vocab_size - 1}, above dstrain's limit "
                 f"{MAX_VOCAB_SIZE - 1}")
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.abspath(folder)))
    result = HFTokenizer(tokenizer, name, start, prepend, vocab_size)

    def spelled(ids):
        return [tokenizer.id_to_token(i) for i in ids]
    print(f"tokenizer: {path} (tokenizers {tokenizers.__version__}), vocabulary {vocab_size:,}: "
          f"{'uint16' if result.token_bytes == 2 else 'uint32'} shards")
    print(f"tokenizer: documents start with {tokenizer.id_to_token(start)!r} (id {start}); "
          f"\"a\" is {spelled([start] * prepend + probe.ids)}; BOS/EOS from {rule}"
          + ("; the tokenizer adds no start token, so it is put in front" if prepend else ""))
    if own != probe.ids:
        print(f"note: transformers 5, which ignores add_bos_token and add_eos_token where there "
              f"is a tokenizer.json, would make \"a\" {spelled(own)}")
    return result


def token_decoder(spec, path):
    """A function token string -> its bytes, doing to one token what tokenizer.json's
    decoder does to it in a sequence (tokenizers passes added and special tokens through
    the decoder too):
      ByteLevel          GPT-2's byte-level alphabet back to bytes (a token with any
                         other character is its UTF-8 bytes, as in tokenizers)
      Metaspace, Replace the word marker (a String pattern, "\u2581") becomes a space
      ByteFallback       <0xNN> is byte NN
      Fuse, Strip        nothing per token: Strip after Fuse removes a leading space of a
                         whole decoded text (SentencePiece's), which a per-token table
                         cannot say; samples keep it
    Anything else is refused: its tokens' bytes would be guesses."""
    if spec is None:
        sys.exit(f"error: {path} has no decoder: the bytes of its tokens are unknown "
                 "(dstrain reads byte-level BPE and SentencePiece-style tokenizers)")
    steps = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
    byte_of = byte_level_bytes()
    byte_token = re.compile(r"<0x([0-9A-Fa-f]{2})>")
    functions = []
    fused = False
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            functions.append(lambda s: bytes(byte_of[c] for c in s) if all(c in byte_of for c in s)
                             else s.encode())
        elif kind == "Metaspace":
            marker = step.get("replacement", "\u2581")
            functions.append(lambda s, marker=marker: s.replace(marker, " "))
        elif kind == "Replace":
            pattern, content = step.get("pattern", {}), step.get("content")
            if "String" not in pattern or not isinstance(content, str):
                sys.exit(f"error: {path}: decoder Replace with {pattern} is not supported "
                         "(only a String pattern)")
            functions.append(lambda s, old=pattern["String"], new=content: s.replace(old, new))
        elif kind == "ByteFallback":
            functions.append(lambda s: bytes([int(m.group(1), 16)])
                             if (m := byte_token.fullmatch(s)) else s)
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip" and fused:
            pass
        else:
            sys.exit(f"error: {path}: decoder {kind!r} is not supported (dstrain reads "
                     "byte-level BPE decoders (ByteLevel) and SentencePiece-style ones "
                     "(Metaspace, Replace, ByteFallback, Fuse, Strip))")

    def decode(token):
        for function in functions:
            if isinstance(token, str):  # bytes already: ByteLevel and ByteFallback end it
                token = function(token)
        return token if isinstance(token, bytes) else token.encode()
    return decode


def write_hf_tokenizer(tok, folder, path):
    """The decode-only tokenizer file of a model's tokenizer: every token id's bytes as
    token_decoder finds them (an id that no token has: empty), the document start token
    in the header."""
    json_path = os.path.join(folder, "tokenizer.json")
    spec = read_json(json_path, "the tokenizer").get("decoder")
    decode = token_decoder(spec, json_path)
    tokens = []
    for i in range(tok.vocab_size):
        token = tok.tokenizer.id_to_token(i)
        tokens.append(b"" if token is None else decode(token))
    write_tokenizer_file(path, tokens, tok.start)


# ----------------------------------------------------------------------------
# documents. A document is a byte range of a UTF-8 file. A file is one document, or is
# split into WikiText articles or paragraphs; document_starts gives the byte offsets
# where its documents start (the first is 0), found with a scan at C speed (mmap, re).


def article_starts(buf):
    """WikiText articles: an article starts at its title, a line " = Title = " with a
    blank line (or the start of the file) before it and a blank line (or the end) after
    it. A " = = Section = = " line, or a formula inside a paragraph that happens to look
    like a title, does not start one. Lines before the first title belong to the first
    article."""
    starts = []
    candidates = [0] if buf[:3] == b" = " else []
    candidates += [m.start() + 1 for m in re.finditer(rb"\n = (?!=)", buf)]
    for p in candidates:
        end = buf.find(b"\n", p)
        end = len(buf) if end < 0 else end
        if not ARTICLE_TITLE.match(buf[p:end]):
            continue
        previous = buf[buf.rfind(b"\n", 0, p - 1) + 1:p] if p else b""
        following_end = buf.find(b"\n", end + 1)
        following = buf[end + 1:len(buf) if following_end < 0 else following_end]
        if not previous.strip() and not following.strip():
            starts.append(p)
    return [0] + starts[1:]


def paragraph_starts(buf):
    """Paragraphs: each with the blank lines after it, so they join back to the text."""
    return [0] + [m.end() for m in re.finditer(rb"\n\n+", buf) if m.end() < len(buf)]


SPLITTERS = {"file": None, "wikitext": article_starts, "paragraphs": paragraph_starts}


def document_starts(path, how):
    """Byte offsets where the documents of a file start: [0] for a file that is one
    document, else as `how` (a key of SPLITTERS) finds them."""
    if SPLITTERS[how] is None or os.path.getsize(path) == 0:
        return [0]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return SPLITTERS[how](buf)


def read_documents(path, how):
    """The documents of a file as strings (for tests and benchmarks; the tokenizer reads
    byte ranges instead)."""
    with open(path, "rb") as f:
        data = f.read()
    starts = document_starts(path, how)
    return [data[a:b].decode("utf-8") for a, b in zip(starts, starts[1:] + [len(data)])]


# A split of a dataset: documents first..last-1 of `files`, a list of (path, document
# starts), the documents numbered in order across the files.


def split_documents(files, first, last):
    """(path, start, end) of each document of a split."""
    index = 0
    for path, starts in files:
        if index + len(starts) > first and index < last:
            ends = starts[1:] + [os.path.getsize(path)]
            for i in range(max(first - index, 0), min(last - index, len(starts))):
                yield path, starts[i], ends[i]
        index += len(starts)


def split_bytes(files, first, last):
    return sum(end - start for _, start, end in split_documents(files, first, last))


def segments(files, first, last, task_bytes, cut=True):
    """(path, start, end, starts a document) for the documents of a split, documents
    longer than task_bytes cut into pieces at safe places (see SAFE_CUT) when `cut`."""
    for path, start, end in split_documents(files, first, last):
        if end - start <= task_bytes or not cut:
            yield path, start, end, True
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            first_piece = True
            while end - start > task_bytes:
                cut = SAFE_CUT.search(buf, start + task_bytes, end)
                if cut is None:
                    break
                yield path, start, cut.start(), first_piece
                start, first_piece = cut.start(), False
            yield path, start, end, first_piece


# ----------------------------------------------------------------------------
# parallel tokenization: tasks (lists of segments, about task_bytes each) go to a pool
# of processes that read and tokenize them; their tokens come back and are written in
# task order, so the output is the same for every number of workers


def make_tasks(segment_stream, task_bytes):
    task, size = [], 0
    for segment in segment_stream:
        task.append(segment)
        size += segment[2] - segment[1]
        if size >= task_bytes:
            yield task
            task, size = [], 0
    if task:
        yield task


_tokenizer = None  # what this process tokenizes with (set_tokenizer sets it)


def set_tokenizer(tokenizer):
    """The pool's initializer: each worker process keeps the tokenizer (GPT2Tokenizer or
    HFTokenizer) in a global."""
    global _tokenizer
    _tokenizer = tokenizer


def encode_task(task):
    """A task's tokens (each document with its start token) as little-endian bytes of
    the tokenizer's width, and the number of bytes of text read."""
    texts, starts = [], []
    nbytes = 0
    f, open_path = None, None
    try:
        for path, start, end, starts_document in task:
            if path != open_path:
                if f:
                    f.close()
                f, open_path = open(path, "rb"), path
            f.seek(start)
            data = f.read(end - start)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte "
                                 f"{start + e.start})") from None
            texts.append(text)
            starts.append(starts_document)
            nbytes += len(data)
    finally:
        if f:
            f.close()
    return _tokenizer.encode(texts, starts), nbytes


def encode_task_to_file(task, path):
    """encode_task in a worker process: the tokens go to a file (handing them back
    through the pool's pipe costs the main process 3 times more CPU)."""
    data, nbytes = encode_task(task)
    with open(path, "wb") as f:
        f.write(data)
    return nbytes


def tokenize(tokenizer, files, first, last, workers, task_bytes=TASK_BYTES):
    """Yield (token bytes, text bytes) for the tasks of a split, in order, tokenized with
    `tokenizer` (GPT2Tokenizer or HFTokenizer) by `workers` processes (in this process
    when workers is 1). At most 2 tasks per worker are in flight, so memory stays
    bounded however large the input is."""
    tasks = make_tasks(segments(files, first, last, task_bytes, tokenizer.cuts_documents),
                       task_bytes)
    if workers <= 1:
        set_tokenizer(tokenizer)
        yield from map(encode_task, tasks)
        return
    # fork where there is fork: workers start in milliseconds and share the tokenizer;
    # elsewhere each worker receives a pickled copy. A worker that dies (out of memory,
    # say) ends the run with BrokenProcessPool instead of a hang. Hugging Face's
    # tokenizers: one thread a worker (and no warning that a fork disabled its threads).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    saved_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=set_tokenizer,
                               initargs=(tokenizer,))
    folder = tempfile.mkdtemp(prefix="dstrain-tokens-")
    pending = deque()

    def result():
        path, future = pending.popleft()
        nbytes = future.result()
        with open(path, "rb") as f:
            data = f.read()
        os.remove(path)
        return data, nbytes

    try:
        for i, task in enumerate(tasks):
            path = os.path.join(folder, f"{i}.bin")
            pending.append((path, pool.submit(encode_task_to_file, task, path)))
            if len(pending) >= 2 * workers:
                yield result()
        while pending:
            yield result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(folder, ignore_errors=True)
        if saved_parallelism is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved_parallelism


def default_workers():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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


def shard_token_count(path, token_bytes=2):
    """Token count in a shard's header, or None when the file is not a valid shard with
    tokens of token_bytes bytes."""
    header = array("i")
    try:
        with open(path, "rb") as f:
            header.frombytes(f.read(256 * 4))
    except (OSError, ValueError):
        return None
    if sys.byteorder == "big":
        header.byteswap()
    magic, version, _ = SHARD_FORMATS[token_bytes]
    valid = (len(header) == 256 and header[0] == magic and header[1] == version
             and os.path.getsize(path) == 256 * 4 + token_bytes * header[2])
    return header[2] if valid else None


def existing_shards(out_dir, name, split, shard_size, inputs, token_bytes=2):
    """Token counts of a split's shards when they are complete (numbered 0, 1, ...; every
    shard but the last holds shard_size tokens of token_bytes bytes) and newer than every
    input (the tokenizer's files included) and than this script; else None."""
    inputs = list(inputs) + [os.path.abspath(__file__)]
    paths = split_shards(out_dir, name, split)
    if not paths or paths != [shard_path(out_dir, name, split, i) for i in range(len(paths))]:
        return None
    if min(map(os.path.getmtime, paths)) <= max(map(os.path.getmtime, inputs)):
        return None
    counts = [shard_token_count(p, token_bytes) for p in paths]
    if None in counts or any(c != shard_size for c in counts[:-1]) or counts[-1] > shard_size:
        return None
    return counts


class ShardWriter:
    """Writes a stream of tokens into shards of shard_size tokens (the last one shorter)
    as it arrives. Shards are written under temporary names (a shard's header is filled
    in when it is full) and all renamed at the end, so the shards that exist are always
    a complete set from one run."""

    def __init__(self, out_dir, name, split, shard_size, token_bytes=2):
        old = glob.glob(os.path.join(glob.escape(out_dir), f"{name}_{split}_*.bin.tmp"))
        for stale in split_shards(out_dir, name, split) + old:
            os.remove(stale)
        self.out_dir, self.name, self.split, self.shard_size = out_dir, name, split, shard_size
        self.token_bytes = token_bytes  # 2: uint16 format, 4: uint32 format
        self.counts = []
        self.file = None
        self.tokens = 0  # in the open shard

    def write(self, data):
        """Appends tokens given as little-endian bytes, token_bytes each."""
        data, width = memoryview(data), self.token_bytes
        while len(data):
            if self.file is None:
                self.file = open(self.temporary(len(self.counts)), "wb")
                self.file.write(bytes(256 * 4))  # the header, filled in at the end
                self.tokens = 0
            n = min(len(data) // width, self.shard_size - self.tokens)
            self.file.write(data[:width * n])
            data = data[width * n:]
            self.tokens += n
            if self.tokens == self.shard_size:
                self.finish_shard()

    def temporary(self, index):
        return shard_path(self.out_dir, self.name, self.split, index) + ".tmp"

    def finish_shard(self):
        header = array("i", [0] * 256)
        magic, version, _ = SHARD_FORMATS[self.token_bytes]
        header[:3] = array("i", [magic, version, self.tokens])
        self.file.seek(0)
        self.file.write(little_endian(header))
        self.file.close()
        self.file = None
        self.counts.append(self.tokens)

    def close(self):
        """Finishes the last shard and renames them all; returns their token counts."""
        if self.file is not None:
            self.finish_shard()
        for i in range(len(self.counts)):
            os.replace(self.temporary(i), shard_path(self.out_dir, self.name, self.split, i))
        return self.counts

    def abandon(self):
        """Removes this run's shards (after an error)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.counts.append(0)
        for i in range(len(self.counts)):
            os.remove(self.temporary(i))
        self.counts = []


def write_shards(tokenizer, files, first, last, out_dir, name, split, shard_size, workers=1,
                 task_bytes=TASK_BYTES):
    """Tokenize documents first..last-1 of files (each with its start token) with up to
    `workers` processes into shards of shard_size tokens, showing progress. Returns
    (token counts of the shards, text bytes read, seconds, workers used)."""
    total = split_bytes(files, first, last)
    workers = max(1, min(workers, -(-total // task_bytes)))  # no more than the tasks
    writer = ShardWriter(out_dir, name, split, shard_size, tokenizer.token_bytes)
    progress = download.Progress(split, total)
    tokens, t0 = 0, time.time()
    try:
        for data, nbytes in tokenize(tokenizer, files, first, last, workers, task_bytes):
            writer.write(data)
            tokens += len(data) // tokenizer.token_bytes
            progress.update(nbytes, f"{tokens / max(time.time() - t0, 1e-9) / 1e6:.2f}M tokens/s")
    except BaseException:
        writer.abandon()
        raise
    counts = writer.close()
    seconds = time.time() - t0
    progress.close(f"{tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s")
    return counts, progress.done, seconds, workers


# ----------------------------------------------------------------------------
# datasets


def wikitext_source(dataset, out_dir, offline):
    """Find WikiText raw files: an earlier download in <out-dir>/raw; else a download (the
    original zip, else the Hugging Face parquet files); else local raw files in
    $DSTRAIN_DATA_DIR or ../shared/data/wikitext. Returns (folder, {split: file split})."""
    info = download.WIKITEXT[dataset]
    raw_dir = os.path.join(out_dir, "raw")

    def has(folder, split):
        return os.path.isfile(os.path.join(folder, f"wiki.{split}.raw"))

    if all(has(raw_dir, s) for s in download.WIKITEXT_SPLITS):
        print(f"source: {raw_dir} ({info['title']}, downloaded earlier)")
        return raw_dir, {"train": "train", "val": "valid"}
    reasons = []
    if offline:
        reasons.append("--offline")
    else:
        os.makedirs(raw_dir, exist_ok=True)
        try:
            where = download.fetch_wikitext(dataset, raw_dir)
            print(f"source: {info['title']} from {where}")
            return raw_dir, {"train": "train", "val": "valid"}
        except download.DownloadError as e:
            reasons.append(str(e))
        if not os.listdir(raw_dir):
            os.rmdir(raw_dir)
    print(f"download: no {info['title']} ({'; '.join(reasons)})")
    candidates = [os.environ.get("DSTRAIN_DATA_DIR"), os.path.join(SHARED_DATA, "wikitext")]
    for folder in filter(None, candidates):
        if has(folder, "valid") and (has(folder, "train") or has(folder, "test")):
            break
        print(f"note: {folder} has no wiki.valid.raw with wiki.train.raw or wiki.test.raw")
    else:
        sys.exit(f"error: no WikiText found: no download, and neither $DSTRAIN_DATA_DIR nor "
                 f"{os.path.join(SHARED_DATA, 'wikitext')} has the raw files")
    print(f"source: local raw files in {folder} (offline fallback: not downloaded, not "
          "checked against a published digest)")
    if has(folder, "train"):
        return folder, {"train": "train", "val": "valid"}
    print("no wiki.train.raw there: training on the test split, validating on the valid split"
          + (" (WikiText-103's valid and test splits are WikiText-2's; only the train split"
             " differs)" if dataset == "wikitext-103" else ""))
    return folder, {"train": "test", "val": "valid"}


def split_count(n, val_fraction):
    """How many of n documents validate: the last val_fraction of them (at least one when
    there are two or more and val_fraction > 0)."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return n_val


def dataset_splits(args, tokenizer_name=None):
    """Resolve the dataset. Returns (name, out_dir, input files, {split: (files, first,
    last)}): each split is documents first..last-1 of files, a list of (path, document
    starts). A model's tokenizer (tokenizer_name) adds its name to the dataset's, so its
    shards never mix with GPT-2's: data/wikitext-<tokenizer>/wikitext-<tokenizer>_*.bin;
    WikiText's downloads stay in the dataset's own folder (data/wikitext/raw)."""
    if args.dir:
        paths = sorted(glob.glob(os.path.join(glob.escape(args.dir), "**", "*.txt"),
                                 recursive=True))
        if not paths:
            sys.exit(f"error: no .txt files under {args.dir}")
        name = args.name or os.path.basename(os.path.normpath(args.dir)) or "text"
    elif args.text:
        paths, name = args.text, args.name or "text"
    else:
        name = args.dataset
    dataset_dir = args.out_dir or os.path.join(REPO, "data", name)
    if tokenizer_name:
        name = f"{name}-{tokenizer_name}"
    out_dir = args.out_dir or os.path.join(REPO, "data", name)
    if args.text or args.dir:
        how = args.documents
        where = f"{len(paths)} .txt file(s) under {args.dir}" if args.dir else \
            f"{len(paths)} text file(s)"
        print(f"source: {where}, " + {
            "file": "one document each", "wikitext": "split into articles at ' = Title = ' lines",
            "paragraphs": "split into documents at blank lines"}[how])
    elif args.dataset == "tinyshakespeare":
        paths, how = [os.path.join(SHARED_DATA, "tinyshakespeare", "input.txt")], "paragraphs"
        if not os.path.isfile(paths[0]):
            sys.exit(f"error: {paths[0]} not found (use --text FILE for your own copy)")
        print(f"source: {paths[0]}, documents split at blank lines")
    else:  # WikiText: a file for each split
        raw_dir, split_files = wikitext_source(args.dataset, dataset_dir, args.offline)
        inputs, splits = [], {}
        for split, f in split_files.items():
            path = os.path.join(raw_dir, f"wiki.{f}.raw")
            starts = document_starts(path, "wikitext")
            inputs.append(path)
            splits[split] = ([(path, starts)], 0, len(starts))
        return name, out_dir, inputs, splits
    files = [(p, document_starts(p, how)) for p in paths]
    n = sum(len(starts) for _, starts in files)
    n_train = n - split_count(n, args.val_fraction)
    return name, out_dir, paths, {"train": (files, 0, n_train), "val": (files, n_train, n)}


# ----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=["wikitext", "wikitext-103", "tinyshakespeare"],
                        default="wikitext", help="built-in dataset (default: %(default)s = "
                        "WikiText-2 raw)")
    source.add_argument("--text", nargs="+", metavar="FILE",
                        help="UTF-8 text files instead, each one document (see --documents)")
    source.add_argument("--dir", metavar="FOLDER",
                        help="every .txt file under FOLDER (recursively, in sorted order) "
                             "instead, each one document (see --documents)")
    parser.add_argument("--documents", choices=sorted(SPLITTERS), default="file",
                        help="how --text/--dir files are split into documents: a file each, "
                             "WikiText articles, or paragraphs (default: %(default)s)")
    parser.add_argument("--name", help="shard name prefix for --text/--dir (default: 'text', "
                                       "or the folder's name for --dir)")
    parser.add_argument("--out-dir", help="folder for the shards (default: data/<name>)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of documents, the last ones, for validation with "
                             "--text/--dir and tinyshakespeare; WikiText has its own split "
                             "(default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=100_000_000,
                        help="tokens per shard (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizer processes (default: the cores available, %(default)s)")
    parser.add_argument("--offline", action="store_true",
                        help="do not download: WikiText from <out-dir>/raw, $DSTRAIN_DATA_DIR "
                             "or ../shared/data/wikitext")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenize with the model's own tokenizer: DIR/tokenizer.json "
                             "(and tokenizer_config.json for BOS/EOS), a Hugging Face model "
                             "folder (default: GPT-2's BPE through tiktoken)")
    parser.add_argument("--tokenizer-name", metavar="NAME",
                        help="with --tokenizer: the name its outputs carry (default: DIR's "
                             "folder name): data/<dataset>-NAME/, data/NAME_tokenizer.bin")
    parser.add_argument("--tokenizer-out",
                        help="tokenizer file to write (default: data/gpt2_tokenizer.bin, or "
                             "data/NAME_tokenizer.bin with --tokenizer)")
    parser.add_argument("--force", action="store_true",
                        help="redo outputs that look up to date (needed after changing "
                             "--val-fraction, --documents or the list of input files)")
    args = parser.parse_args()
    if args.shard_size <= 0 or args.shard_size > 2**31 - 1:
        parser.error("--shard-size must be in 1..2147483647 (the header holds an int32)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    for path in args.text or []:
        if not os.path.isfile(path):
            parser.error(f"--text: {path} is not a file")
    if args.dir and not os.path.isdir(args.dir):
        parser.error(f"--dir: {args.dir} is not a folder")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        parser.error(f"--tokenizer: {args.tokenizer} is not a folder")
    if args.tokenizer_name is not None and not args.tokenizer:
        parser.error("--tokenizer-name needs --tokenizer")
    if args.tokenizer_name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tokenizer_name):
        parser.error("--tokenizer-name: letters, digits, '.', '_' and '-' only")

    t0 = time.time()
    if args.tokenizer:
        tokenizer = hf_tokenizer(args.tokenizer, args.tokenizer_name)
        if tokenizer.name == "gpt2" and not args.tokenizer_out:
            parser.error("--tokenizer: data/gpt2_tokenizer.bin is the built-in GPT-2 "
                         "tokenizer's; give --tokenizer-name or --tokenizer-out")
        tokenizer_files = [os.path.join(args.tokenizer, f) for f in
                           ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
        tokenizer_files = [f for f in tokenizer_files if os.path.isfile(f)]
        tokenizer_out = (args.tokenizer_out
                         or os.path.join(REPO, "data", f"{tokenizer.name}_tokenizer.bin"))
    else:
        encoding, tokenizer_files = gpt2_encoding()
        assert encoding.n_vocab == GPT2_VOCAB_SIZE and encoding.eot_token == EOT
        tokenizer = GPT2Tokenizer(encoding)
        tokenizer_out = args.tokenizer_out or os.path.join(REPO, "data", "gpt2_tokenizer.bin")
    tokenizer_fresh = (os.path.isfile(tokenizer_out) and not args.force and all(
        os.path.getmtime(tokenizer_out) > os.path.getmtime(p)
        for p in tokenizer_files + [os.path.abspath(__file__)]))
    if tokenizer_fresh:
        print(f"tokenizer: {tokenizer_out} is up to date")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(tokenizer_out)), exist_ok=True)
        if args.tokenizer:
            write_hf_tokenizer(tokenizer, args.tokenizer, tokenizer_out)
        else:
            write_tokenizer(encoding, tokenizer_out)
        print(f"tokenizer: wrote {tokenizer_out}")

    name, out_dir, inputs, splits = dataset_splits(args, args.tokenizer and tokenizer.name)
    inputs = list(inputs) + (tokenizer_files if args.tokenizer else [])
    print(f"shards: {out_dir}/{name}_{{train,val}}_NNNNNN.bin, "
          f"{'uint16' if tokenizer.token_bytes == 2 else 'uint32'} tokens")
    os.makedirs(out_dir, exist_ok=True)
    for split, (files, first, last) in splits.items():
        counts = None if args.force else existing_shards(out_dir, name, split, args.shard_size,
                                                         inputs, tokenizer.token_bytes)
        if counts is not None:
            status = "up to date"
        else:
            try:
                counts, nbytes, seconds, workers = write_shards(
                    tokenizer, files, first, last, out_dir, name, split, args.shard_size,
                    args.workers)
            except ValueError as e:  # text that is not UTF-8, from a worker
                sys.exit(f"error: {e}")
            rate = max(seconds, 1e-9)
            status = (f"written from {nbytes / 1e6:,.1f} MB of text in {seconds:.1f} s "
                      f"({nbytes / 1e6 / rate:.1f} MB/s, {sum(counts) / 1e6 / rate:.2f}M "
                      f"tokens/s, {workers} worker(s))")
        print(f"{split}: {last - first:,} documents, {sum(counts):,} tokens in {len(counts)} "
              f"shard(s), {status}")
        for i in range(len(counts)):
            print(f"  {shard_path(out_dir, name, split, i)}")
        if not counts:
            print(f"warning: the {split} split has no documents")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
