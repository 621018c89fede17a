"""
Tests of data/prepare.py (GPT-2 tokens, a model's own tokenizer, shards, parallel
tokenization, the decode-only tokenizer file) and data/download.py (downloads).

    python3 tests/test_data.py

Needs tiktoken, Hugging Face's tokenizers (the model tokenizers are built here, trained
on Tiny Shakespeare) and the local data in ../shared/data (the WikiText valid and test
splits, GPT-2's encoder.json and vocab.bpe, Tiny Shakespeare); no network: downloads are
tested against an HTTP server on 127.0.0.1 that this test starts. Prints one line per
check, then "N passed, N failed"; exits non-zero when a check fails.
"""

import hashlib
import http.server
import io
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "data"))
import download  # noqa: E402
import prepare  # noqa: E402
import tiktoken  # noqa: E402
from checks import check, summary  # noqa: E402

SHARED = prepare.SHARED_DATA
WIKITEXT_DIR = os.path.join(SHARED, "wikitext")


def reference_encoding(tmp):
    """tiktoken's own "gpt2" encoding, independent of prepare.py: tiktoken's definition
    (pattern, special tokens, the hashes it checks) with its file cache filled from the
    local copies of the two BPE files, so it needs no network."""
    cache = os.path.join(tmp, "tiktoken-cache")
    os.makedirs(cache)
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # tiktoken_ext
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()  # tiktoken's cache file name
        shutil.copy(os.path.join(SHARED, "gpt2", name), os.path.join(cache, key))
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    socket.setdefaulttimeout(3)  # should the cache miss, fail fast instead of hanging
    try:
        return tiktoken.get_encoding("gpt2")
    finally:
        socket.setdefaulttimeout(None)


def read_shard(path):
    """(header ints, tokens) of a shard file of either format (uint16 or uint32 tokens)."""
    with open(path, "rb") as f:
        data = f.read()
    header = struct.unpack("<256i", data[:1024])
    width, code = (4, "I") if header[0] == 20240801 else (2, "H")
    tokens = list(struct.unpack(f"<{(len(data) - 1024) // width}{code}", data[1024:]))
    return header, tokens


def split_at_eot(tokens):
    """Documents' tokens from a stream in which EOT precedes every document."""
    documents = []
    for t in tokens:
        if t == prepare.EOT:
            documents.append([])
        else:
            documents[-1].append(t)
    return documents if tokens and tokens[0] == prepare.EOT else None


def expected_stream(ref, documents):
    out = []
    for d in documents:
        out.append(prepare.EOT)
        out += ref.encode_ordinary(d)
    return out


def run_prepare(*args):
    """Runs data/prepare.py; returns (exit code, output)."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "data", "prepare.py"), *args],
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout + result.stderr


# ----------------------------------------------------------------------------


def test_articles():
    text = (" \n = First = \n \n intro \n \n = = Section = = \n \n body \n \n"
            " = = = Sub = = = \n \n more \n x \n = 1 rad / s = \n y \n \n = Second = \n \n end \n")
    path = os.path.join(TMP, "articles.raw")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    articles = prepare.read_documents(path, "wikitext")
    check("articles: split at ' = Title = ' only, section headings stay inside",
          len(articles) == 2 and articles[0].startswith(" \n = First = ")
          and " = = Section = = " in articles[0] and " = = = Sub = = = " in articles[0]
          and articles[1].startswith(" = Second = "), repr(articles))
    check("articles: a title-like line inside a paragraph is not a boundary",
          " = 1 rad / s = " in articles[0])
    check("articles: join back to the text", "".join(articles) == text)
    # WikiText-2 has 600/60/60 articles (Merity et al. 2016, "Pointer Sentinel Mixture Models")
    for split in ("valid", "test"):
        path = os.path.join(WIKITEXT_DIR, f"wiki.{split}.raw")
        articles = prepare.read_documents(path, "wikitext")
        with open(path, encoding="utf-8", newline="") as f:
            whole = f.read()
        check(f"articles: wiki.{split}.raw has WikiText's 60 articles, joined back to the file",
              len(articles) == 60 and "".join(articles) == whole, f"{len(articles)} articles")


def test_safe_cuts(ref):
    """A cut at prepare.SAFE_CUT never changes the tokens: fuzzed tricky text, and
    tinyshakespeare cut into pieces as the tokenizer's tasks cut long documents."""
    rng = random.Random(1234)
    alphabet = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u2009", "\u3000", "\x0b",
                "\x1c", "a", "Z", "word", "1", "23", "'", "'s", "'ll", "!", ".", "@-@", "é",
                "中文", "🙂", "-", "=", " = "]
    bad = []
    cuts = 0
    for _ in range(300):
        data = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))).encode()
        whole = ref.encode_ordinary(data.decode())
        for m in prepare.SAFE_CUT.finditer(data):
            cuts += 1
            p = m.start()
            if ref.encode_ordinary(data[:p].decode()) + ref.encode_ordinary(data[p:].decode()) != whole:
                bad.append((data, p))
    check(f"safe cuts: tokens of the pieces equal the whole's ({cuts} fuzzed cuts)", not bad,
          repr(bad[:3]))
    path = os.path.join(SHARED, "tinyshakespeare", "input.txt")
    with open(path, "rb") as f:
        data = f.read()
    pieces = [data[a:b] for _, a, b, _ in prepare.segments([(path, [0])], 0, 1, 5000)]
    ok = (len(pieces) > 100 and b"".join(pieces) == data
          and sum((ref.encode_ordinary(p.decode()) for p in pieces), [])
          == ref.encode_ordinary(data.decode()))
    check(f"safe cuts: tinyshakespeare in {len(pieces)} pieces tokenizes as the whole", ok)


def test_tokens(ref, encoding):
    """(a) Every article of the local valid and test splits, tokenized by prepare.py's
    path (1 and 2 workers, small tasks so that long articles are cut into pieces), equals
    tiktoken's gpt2 encoding."""
    encoding = prepare.GPT2Tokenizer(encoding)
    for split in ("valid", "test"):
        path = os.path.join(WIKITEXT_DIR, f"wiki.{split}.raw")
        articles = prepare.read_documents(path, "wikitext")
        expected = [ref.encode_ordinary(a) for a in articles]
        files = [(path, prepare.document_starts(path, "wikitext"))]
        for workers, task_bytes in ((1, prepare.TASK_BYTES), (2, prepare.TASK_BYTES), (2, 4096)):
            data = b"".join(d for d, _ in prepare.tokenize(encoding, files, 0, len(articles),
                                                           workers, task_bytes))
            got = split_at_eot(list(struct.unpack(f"<{len(data) // 2}H", data)))
            wrong = [i for i, (g, e) in enumerate(zip(got or [], expected)) if g != e]
            check(f"tokens: {split}, {len(articles)} articles, workers={workers}, tasks of "
                  f"{task_bytes} bytes: each equals tiktoken gpt2",
                  got is not None and len(got) == len(expected) and not wrong,
                  f"{len(got or [])} documents, articles {wrong[:5]} differ")
    text = "A literal <|endoftext|> is text, not token 50256. <|endoftext|>\n"
    path = os.path.join(TMP, "special.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    data = b"".join(d for d, _ in prepare.tokenize(encoding, [(path, [0])], 0, 1, 1))
    tokens = list(struct.unpack(f"<{len(data) // 2}H", data))
    check("tokens: a literal <|endoftext|> in the text is ordinary text",
          tokens == [prepare.EOT] + ref.encode_ordinary(text) and tokens.count(50256) == 1)


def test_prepare_command(ref):
    """(b)+(c) The one command on the local WikiText splits: shards read back, hold
    EOT + tokens of each article in order, and are the same for 1 and 2 workers."""
    outputs = {}
    for workers in (1, 2):
        out = os.path.join(TMP, f"wikitext-w{workers}")
        rc, log = run_prepare("--offline", "--out-dir", out, "--workers", str(workers),
                              "--tokenizer-out", os.path.join(out, "tok.bin"))
        check(f"prepare.py --offline --workers {workers}: exit 0, says offline",
              rc == 0 and "offline" in log and "local raw files" in log, log[-2000:])
        outputs[workers] = out
    for split, source in (("train", "test"), ("val", "valid")):
        path = os.path.join(outputs[2], f"wikitext_{split}_000000.bin")
        header, tokens = read_shard(path)
        articles = prepare.read_documents(os.path.join(WIKITEXT_DIR, f"wiki.{source}.raw"),
                                          "wikitext")
        check(f"shards: {split} header magic 20240520, version 1, count = file length",
              header[:2] == (20240520, 1) and header[2] == len(tokens) and not any(header[3:]),
              str(header[:4]))
        check(f"shards: {split} = EOT + tiktoken gpt2 tokens of each of the {len(articles)} "
              f"articles of wiki.{source}.raw, in order", tokens == expected_stream(ref, articles))
        same = all(open(os.path.join(outputs[1], f), "rb").read()
                   == open(os.path.join(outputs[2], f), "rb").read()
                   for f in (f"wikitext_{split}_000000.bin", "tok.bin"))
        check(f"shards: {split} byte-identical for 1 and 2 workers", same)
    with open(os.path.join(outputs[2], "tok.bin"), "rb") as f:
        data = f.read()
    header = struct.unpack("<256I", data[:1024])
    pos, ok = 1024, header[:4] == (20240328, 2, 50257, 50256)
    for token in range(50257):
        n = data[pos]
        ok = ok and data[pos + 1:pos + 1 + n] == ref.decode_single_token_bytes(token)
        pos += 1 + n
    check("tokenizer file: header {20240328, 2, 50257, 50256}, every token's bytes",
          ok and pos == len(data))
    rc, log = run_prepare("--offline", "--out-dir", outputs[2], "--workers", "2",
                          "--tokenizer-out", os.path.join(outputs[2], "tok.bin"))
    check("prepare.py again: outputs up to date", rc == 0 and log.count("up to date") == 3, log)


def test_shard_sizes(encoding):
    """(d)+(c) --shard-size splitting, the same for 1 and 2 workers."""
    path = os.path.join(WIKITEXT_DIR, "wiki.valid.raw")
    articles = prepare.read_documents(path, "wikitext")
    files = [(path, prepare.document_starts(path, "wikitext"))]
    streams = {}
    for workers in (1, 2):
        out = os.path.join(TMP, f"shards-w{workers}")
        os.makedirs(out)
        counts, nbytes, _, _ = prepare.write_shards(prepare.GPT2Tokenizer(encoding), files, 0,
                                                    len(articles), out, "v",
                                                    "val", 100_000, workers, 65536)
        shards = prepare.split_shards(out, "v", "val")
        streams[workers] = [open(f, "rb").read() for f in shards]
        tokens = []
        headers_ok = True
        for f in shards:
            header, t = read_shard(f)
            headers_ok = headers_ok and header[:3] == (20240520, 1, len(t))
            tokens += t
    check("shard size: 249,947 tokens at 100,000 a shard make 3 shards, valid headers",
          counts == [100_000, 100_000, 49_947] and headers_ok, str(counts))
    check("shard size: the shards concatenate to the whole stream",
          tokens == expected_stream(encoding, articles))
    check("shard size: 1 and 2 workers (tasks of 64 KB) give byte-identical shards",
          streams[1] == streams[2])
    check("shard size: bytes of text counted", nbytes == sum(len(a.encode()) for a in articles))
    check("shard size: existing_shards sees them complete",
          prepare.existing_shards(os.path.join(TMP, "shards-w2"), "v", "val", 100_000, [])
          == [100_000, 100_000, 49_947])
    # an exact multiple leaves no empty shard; a later, smaller run removes stale shards
    out = os.path.join(TMP, "exact")
    os.makedirs(out)
    writer = prepare.ShardWriter(out, "x", "train", 5)
    for chunk in ([1, 2, 3], [4, 5, 6, 7, 8, 9, 10]):
        writer.write(struct.pack(f"<{len(chunk)}H", *chunk))
    counts = writer.close()
    check("shard size: 10 tokens at 5 a shard make exactly 2 shards",
          counts == [5, 5] and [read_shard(f)[1] for f in prepare.split_shards(out, "x", "train")]
          == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], str(counts))
    writer = prepare.ShardWriter(out, "x", "train", 5)
    writer.write(struct.pack("<3H", 1, 2, 3))
    writer.close()
    check("shard size: rewriting removes the old shards",
          len(prepare.split_shards(out, "x", "train")) == 1)


def test_text_and_dir(ref):
    """--dir (recursive .txt, sorted) and --text with --documents wikitext."""
    folder = os.path.join(TMP, "corpus")
    os.makedirs(os.path.join(folder, "b", "c"))
    files = {"a.txt": "Hello world.\n", os.path.join("b", "c", "z.txt"): "Second file, 'll see.\n",
             os.path.join("b", "notes.md"): "not text\n"}
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    out = os.path.join(TMP, "corpus-out")
    rc, log = run_prepare("--dir", folder, "--out-dir", out, "--val-fraction", "0.5",
                          "--workers", "2", "--tokenizer-out", os.path.join(out, "tok.bin"))
    train = read_shard(os.path.join(out, "corpus_train_000000.bin"))[1] if rc == 0 else None
    val = read_shard(os.path.join(out, "corpus_val_000000.bin"))[1] if rc == 0 else None
    check("--dir: every .txt file (recursively, sorted), one document each",
          train == expected_stream(ref, ["Hello world.\n"])
          and val == expected_stream(ref, ["Second file, 'll see.\n"]), log[-2000:])
    out = os.path.join(TMP, "text-out")
    valid = os.path.join(WIKITEXT_DIR, "wiki.valid.raw")
    rc, log = run_prepare("--text", valid, "--documents", "wikitext", "--name", "wv",
                          "--val-fraction", "0.1", "--out-dir", out,
                          "--tokenizer-out", os.path.join(out, "tok.bin"))
    articles = prepare.read_documents(valid, "wikitext")
    tokens = (read_shard(os.path.join(out, "wv_train_000000.bin"))[1]
              + read_shard(os.path.join(out, "wv_val_000000.bin"))[1]) if rc == 0 else None
    n_val = len(read_shard(os.path.join(out, "wv_val_000000.bin"))[1]) if rc == 0 else 0
    check("--text --documents wikitext: the file's 60 articles, EOT + tokens each, the last "
          "6 validating", tokens == expected_stream(ref, articles)
          and n_val == len(expected_stream(ref, articles[54:])), log[-2000:])
    rc, log = run_prepare("--dir", os.path.join(TMP, "no-such-folder"))
    check("--dir: a missing folder is refused", rc != 0 and "not a folder" in log, log)
    bad = os.path.join(TMP, "latin1.txt")
    with open(bad, "wb") as f:
        f.write("caf\u00e9 au lait\n".encode("latin-1"))
    out = os.path.join(TMP, "bad-out")
    rc, log = run_prepare("--text", valid, bad, "--out-dir", out, "--workers", "2",
                          "--val-fraction", "0", "--shard-size", "10000",
                          "--tokenizer-out", os.path.join(out, "tok.bin"))
    check("--text: a file that is not UTF-8 is refused, naming the file and byte; the "
          "shards written before it are removed",
          rc != 0 and "latin1.txt: not UTF-8" in log and "byte 3" in log
          and os.listdir(out) == ["tok.bin"], f"{os.listdir(out)} {log[-2000:]}")


# ----------------------------------------------------------------------------
# a model's own tokenizer (--tokenizer DIR), with tokenizers built here by the tokenizers
# package: byte-level BPE as DeepSeek's, the same with a vocabulary past 65,535 (uint32
# shards), SentencePiece-style BPE with byte fallback as LLaMA-2's

BOS_DS, EOS_DS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek's


def train_bpe(pre_tokenizer, special_tokens, vocab_size=2000):
    """A BPE tokenizer trained on Tiny Shakespeare."""
    from tokenizers import Tokenizer, models, trainers
    with open(os.path.join(SHARED, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    extra = {"initial_alphabet": pre_tokenizer.alphabet()} if hasattr(pre_tokenizer, "alphabet") else {}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  show_progress=False, **extra)
    tokenizer.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)], trainer)
    return tokenizer


def save_model_tokenizer(folder, tokenizer, config):
    os.makedirs(folder)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False)
    return folder


def byte_level_tokenizer(folder, big=False):
    """DeepSeek-style: ByteLevel pre-tokenizer and decoder, BOS <｜begin▁of▁sentence｜>
    (a {"content": ...} dict in tokenizer_config.json, add_bos_token true). big: 64,000
    added tokens, then three words that Shakespeare uses (ids 66,000-66,002), and EOS
    after every document (add_eos_token true)."""
    from tokenizers import pre_tokenizers, decoders
    tokenizer = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), [BOS_DS, EOS_DS])
    tokenizer.decoder = decoders.ByteLevel()
    config = {"add_bos_token": True, "add_eos_token": big, "tokenizer_class": "LlamaTokenizerFast",
              "bos_token": {"__type": "AddedToken", "content": BOS_DS, "special": True},
              "eos_token": {"__type": "AddedToken", "content": EOS_DS, "special": True}}
    if big:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(64000)] + ["ROMEO", "JULIET", "thee"])
    return save_model_tokenizer(folder, tokenizer, config)


def sentencepiece_tokenizer(folder):
    """LLaMA-2-style: Metaspace pre-tokenizer, <0x00>..<0xFF> byte-fallback tokens,
    decoder Replace("\u2581", " "), ByteFallback, Fuse, Strip; BOS "<s>" (a string)."""
    from tokenizers import Tokenizer, pre_tokenizers, decoders
    tokenizer = train_bpe(pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
                          ["<unk>", "<s>", "</s>"])
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    n = len(vocab)
    vocab.update({f"<0x{b:02X}>": n + b for b in range(256)})
    spec["model"].update(byte_fallback=True, unk_token="<unk>", fuse_unk=True)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
              "tokenizer_class": "LlamaTokenizerFast"}
    return save_model_tokenizer(folder, tokenizer, config)


def model_corpus():
    """Tiny Shakespeare, then paragraphs that the tokenizers were not trained on: other
    scripts, emoji, a literal special token, runs of spaces and blank-ish lines."""
    path = os.path.join(TMP, "model-corpus.txt")
    with open(os.path.join(SHARED, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read()
    text += ("\n\nCafé, naïve, Ærøskøbing; 中文 and 日本語 text, emoji 🙂🚀, math ∑ x².\n\n"
             f"A literal {BOS_DS} and <s> and <0x41> in the text.\n\n"
             "    indented    with   runs of spaces\t\tand tabs \n\n"
             "ROMEO and JULIET: thee, thee, thee.\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def read_tokenizer_file(path):
    """(header, list of each token's bytes) of a decode-only tokenizer file."""
    with open(path, "rb") as f:
        data = f.read()
    header = struct.unpack("<256I", data[:1024])
    pos, tokens = 1024, []
    for _ in range(header[2]):
        n = data[pos]
        pos += 1
        if n == 0:
            n = struct.unpack("<I", data[pos:pos + 4])[0]
            pos += 4
        tokens.append(data[pos:pos + n])
        pos += n
    assert pos == len(data), f"{path}: {len(data) - pos} bytes after the last token"
    return header, tokens


def check_model_tokenizer(label, folder, bos, eos=None, uint32=False, worker_counts=(1, 3)):
    """prepare.py --tokenizer on the corpus: every document's tokens are BOS + tokenizers'
    own encoding (+ EOS), for every worker count byte for byte; the shard format fits
    the vocabulary; the decode-only file decodes every id as tokenizers does."""
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    bos_id, eos_id = reference.token_to_id(bos), eos and reference.token_to_id(eos)
    corpus = model_corpus()
    documents = prepare.read_documents(corpus, "paragraphs")
    n_val = prepare.split_count(len(documents), 0.1)
    per_document = [[bos_id] + reference.encode(d, add_special_tokens=False).ids
                    + ([eos_id] if eos else []) for d in documents]
    expected = sum(per_document, [])
    expected_val = sum(per_document[len(documents) - n_val:], [])
    shards = {}
    for workers in worker_counts:
        out = os.path.join(TMP, f"{label}-w{workers}")
        rc, log = run_prepare("--text", corpus, "--documents", "paragraphs", "--tokenizer", folder,
                              "--out-dir", out, "--workers", str(workers),
                              "--tokenizer-out", os.path.join(out, "tok.bin"))
        name = f"text-{os.path.basename(folder)}"
        paths = [os.path.join(out, f"{name}_{s}_000000.bin") for s in ("train", "val")]
        check(f"{label}: prepare.py --tokenizer --workers {workers}: exit 0, names the shards "
              f"{name}_*", rc == 0 and all(os.path.isfile(p) and p in log for p in paths), log[-3000:])
        if rc != 0:
            return
        shards[workers] = [open(p, "rb").read() for p in paths]
    (header, train), (_, val) = read_shard(paths[0]), read_shard(paths[1])
    stream = train + val
    fmt = (20240801, 7) if uint32 else (20240520, 1)
    check(f"{label}: {'uint32' if uint32 else 'uint16'} shards (header {fmt[0]}, {fmt[1]})",
          header[:3] == fmt + (len(train),), str(header[:3]))
    check(f"{label}: shards = {'BOS + tokens + EOS' if eos else 'BOS + tokens'} of each of the "
          f"{len(documents)} documents, tokenizers' own encoding, in order",
          stream == expected, f"{len(stream)} tokens, expected {len(expected)}")
    check(f"{label}: the last {n_val} documents validate", val == expected_val)
    if uint32:
        check(f"{label}: ids above 65,535 reach the shards", max(stream) > 65535, str(max(stream)))
    check(f"{label}: shards byte-identical for {worker_counts} workers",
          all(s == shards[worker_counts[0]] for s in shards.values()))
    # the decode-only file against tokenizers' decode
    tok_header, tokens = read_tokenizer_file(os.path.join(out, "tok.bin"))
    vocab_size = max(reference.get_vocab(with_added_tokens=True).values()) + 1
    check(f"{label}: tokenizer file header {{20240328, 2, {vocab_size}, BOS {bos_id}}}",
          tok_header[:4] == (20240328, 2, vocab_size, bos_id), str(tok_header[:4]))
    text = b"".join(tokens[t] for t in stream)
    check(f"{label}: tokenizer file: the shards' tokens' bytes, concatenated, are tokenizers' "
          "decode of them", text.decode("utf-8", "replace")
          == reference.decode(stream, skip_special_tokens=False))
    bos_text = reference.decode([bos_id], skip_special_tokens=False)
    wrong, partial = [], 0
    for i, data in enumerate(tokens):
        try:
            piece = data.decode("utf-8")
        except UnicodeDecodeError:
            partial += 1  # a byte token or part of a character: the concatenation checks it
            continue
        if reference.decode([bos_id, i], skip_special_tokens=False) != bos_text + piece:
            wrong.append((i, reference.id_to_token(i), data))
    check(f"{label}: tokenizer file: each of the {len(tokens) - partial} ids that are whole "
          f"characters decodes as tokenizers decodes it after BOS ({partial} partial)",
          not wrong, repr(wrong[:5]))
    return tokens


def test_model_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        check("the tokenizers package is installed (python3 -m pip install tokenizers)", False)
        return
    folder = byte_level_tokenizer(os.path.join(TMP, "bytelevel"))
    check_model_tokenizer("byte-level BPE", folder, BOS_DS)
    # a document longer than a task is never cut (each piece would get a BOS)
    from tokenizers import Tokenizer
    reference = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    corpus = model_corpus()
    with open(corpus, encoding="utf-8") as f:
        whole = f.read()
    stdout, sys.stdout = sys.stdout, io.StringIO()
    try:
        tok = prepare.hf_tokenizer(folder)
    finally:
        sys.stdout = stdout
    data = b"".join(d for d, _ in prepare.tokenize(tok, [(corpus, [0])], 0, 1, 2, 65536))
    check("byte-level BPE: a 1.1 MB document in tasks of 64 KB on 2 workers is one encoding",
          list(struct.unpack(f"<{len(data) // 2}H", data))
          == [reference.token_to_id(BOS_DS)] + reference.encode(whole, add_special_tokens=False).ids)
    rc, log = run_prepare("--tokenizer", folder, "--offline", "--workers", "1",
                          "--tokenizer-out", os.path.join(TMP, "bl.bin"),
                          "--out-dir", os.path.join(TMP, "bl-wikitext"))
    check("byte-level BPE: WikiText with --out-dir: shards named wikitext-bytelevel_*",
          rc == 0 and os.path.isfile(os.path.join(TMP, "bl-wikitext",
                                                  "wikitext-bytelevel_val_000000.bin")),
          log[-2000:])
    folder = byte_level_tokenizer(os.path.join(TMP, "biglevel"), big=True)
    check_model_tokenizer("66,001 tokens", folder, BOS_DS, EOS_DS, uint32=True, worker_counts=(1, 2))
    folder = sentencepiece_tokenizer(os.path.join(TMP, "sentencepiece"))
    tokens = check_model_tokenizer("SentencePiece-style", folder, "<s>")
    if tokens:
        from tokenizers import Tokenizer
        reference = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        ok = all(tokens[reference.token_to_id(f"<0x{b:02X}>")] == bytes([b]) for b in range(256))
        ok = ok and tokens[reference.token_to_id("\u2581the")] == b" the"
        check("SentencePiece-style: <0xNN> is byte NN, \"\u2581the\" is \" the\"", ok)
        stream = reference.encode("中文 🙂").ids
        check("SentencePiece-style: characters it never saw are byte tokens",
              sum(reference.id_to_token(i).startswith("<0x") for i in stream) >= 10,
              str([reference.id_to_token(i) for i in stream]))
    test_bos_rules()
    test_refused_tokenizers()


def test_bos_rules():
    """BOS/EOS as transformers 4's AutoTokenizer adds them (checked by hand against
    transformers 4.57; transformers 5 ignores add_bos_token/add_eos_token where there is
    a tokenizer.json): add_bos_token/add_eos_token for LLaMA's tokenizer class (or no
    class), else tokenizer.json's post-processor; a tokenizer that adds nothing gets its
    BOS (or EOS, as GPT-2's) put in front."""
    from tokenizers import Tokenizer, pre_tokenizers, decoders, processors
    documents = ["First document.\n", "Second one, 'll see.\n\n", ""]
    path = os.path.join(TMP, "three.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(documents))
    files = [(path, [0, len(documents[0]), len(documents[0]) + len(documents[1])])]

    def stream_of(folder):
        buffer = io.StringIO()
        stdout, sys.stdout = sys.stdout, buffer
        try:
            tok = prepare.hf_tokenizer(folder)
        finally:
            sys.stdout = stdout
        data = b"".join(d for d, _ in prepare.tokenize(tok, files, 0, 2, 1))
        return list(struct.unpack(f"<{len(data) // 2}H", data)), tok, buffer.getvalue()

    base = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                     ["<s>", "</s>", "<|endoftext|>"], 500)
    base.decoder = decoders.ByteLevel()
    plain = base.to_str()  # no post-processor
    ids = [base.encode(d, add_special_tokens=False).ids for d in documents[:2]]
    s, e, eot = base.token_to_id("<s>"), base.token_to_id("</s>"), base.token_to_id("<|endoftext|>")
    base.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", s), ("</s>", e)])
    stream, tok, _ = stream_of(save_model_tokenizer(os.path.join(TMP, "template"), base, None))
    check("BOS rules: no tokenizer_config.json: tokenizer.json's post-processor (<s> $A </s>)",
          stream == [s] + ids[0] + [e] + [s] + ids[1] + [e] and tok.start == s and not tok.prepend,
          str(stream[:8]))
    stream, tok, log = stream_of(save_model_tokenizer(os.path.join(TMP, "template-off"), base,
                                                      {"add_bos_token": True, "bos_token": "<s>"}))
    check("BOS rules: add_bos_token in tokenizer_config.json (no tokenizer_class: LLaMA's) "
          "replaces the post-processor, and says what transformers 5 would do",
          stream == [s] + ids[0] + [s] + ids[1] and "note: transformers 5" in log, log)
    stream, tok, _ = stream_of(save_model_tokenizer(
        os.path.join(TMP, "template-generic"), base,
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    check("BOS rules: PreTrainedTokenizerFast ignores add_bos_token/add_eos_token: the "
          "post-processor decides", stream == [s] + ids[0] + [e] + [s] + ids[1] + [e], str(stream[:8]))
    base = Tokenizer.from_str(plain)
    stream, tok, _ = stream_of(save_model_tokenizer(
        os.path.join(TMP, "plain-llama"), base,
        {"add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>",
         "tokenizer_class": "LlamaTokenizerFast"}))
    check("BOS rules: LlamaTokenizerFast, no post-processor: add_eos_token true, add_bos_token "
          "true by default",
          stream == [s] + ids[0] + [e] + [s] + ids[1] + [e], str(stream[:8]))
    stream, tok, log = stream_of(save_model_tokenizer(
        os.path.join(TMP, "gpt2-like"), base, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    check("BOS rules: a tokenizer that adds no BOS (GPT-2's): its BOS in front, and says so",
          stream == [eot] + ids[0] + [eot] + ids[1] and tok.prepend and "put in front" in log, log)
    stream, tok, _ = stream_of(save_model_tokenizer(os.path.join(TMP, "eos-only"), base,
                                                    {"eos_token": "</s>"}))
    check("BOS rules: no BOS at all: the EOS starts documents", stream == [e] + ids[0] + [e] + ids[1])


def test_refused_tokenizers():
    from tokenizers import pre_tokenizers, decoders
    text = os.path.join(TMP, "refused.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write("Some text.\n")
    base = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<s>"], 300)
    base.decoder = decoders.WordPiece()
    folder = save_model_tokenizer(os.path.join(TMP, "wordpiece"), base,
                                  {"add_bos_token": True, "bos_token": "<s>"})
    rc, log = run_prepare("--tokenizer", folder, "--text", text,
                          "--out-dir", os.path.join(TMP, "wp-out"))
    check("refused: a WordPiece decoder, naming the file and the decoder",
          rc != 0 and "tokenizer.json: decoder 'WordPiece' is not supported" in log, log[-1000:])
    folder = save_model_tokenizer(os.path.join(TMP, "nobos"), base,
                                  {"add_bos_token": True, "bos_token": "<nope>"})
    rc, log = run_prepare("--tokenizer", folder, "--text", text)
    check("refused: a bos_token that is no token, naming tokenizer_config.json",
          rc != 0 and "tokenizer_config.json: bos_token '<nope>' is not a token" in log, log[-1000:])
    base.decoder = decoders.ByteLevel()
    folder = save_model_tokenizer(os.path.join(TMP, "named", "gpt2"), base, {"bos_token": "<s>"})
    rc, log = run_prepare("--tokenizer", folder, "--text", text)
    check("refused: a tokenizer folder called gpt2 would overwrite data/gpt2_tokenizer.bin",
          rc != 0 and "give --tokenizer-name or --tokenizer-out" in log, log[-1000:])
    out = os.path.join(TMP, "named-out")
    rc, log = run_prepare("--tokenizer", folder, "--tokenizer-name", "gpt2-hf", "--text", text,
                          "--val-fraction", "0", "--out-dir", out,
                          "--tokenizer-out", os.path.join(out, "tok.bin"))
    check("--tokenizer-name names the shards",
          rc == 0 and os.path.isfile(os.path.join(out, "text-gpt2-hf_train_000000.bin")), log[-1000:])
    rc, log = run_prepare("--tokenizer", TMP, "--text", text)
    check("refused: a folder without tokenizer.json",
          rc != 0 and "tokenizer.json not found" in log, log[-1000:])


# ----------------------------------------------------------------------------
# downloads, against a local HTTP server


class Server:
    """An HTTP server on 127.0.0.1 for the download tests. Paths:
    /<name>            the file, honouring "Range: bytes=N-" (206)
    /broken/<name>     first request: headers for the whole file, then half of it, then
                       the connection closes; later requests as /<name>
    /stall/<name>      first request: half the file, then silence for 3 s
    /norange/<name>    ignores Range (always 200 and the whole file)
    /api               the JSON in self.api
    anything else      404"""

    def __init__(self):
        self.files, self.requests, self.first = {}, [], set()
        self.api = b"[]"
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts == ["api"]:
                    return self.send(200, server.api, {})
                kind, name = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
                data = server.files.get(name)
                if data is None or kind not in ("", "broken", "stall", "norange"):
                    return self.send(404, b"not found", {})
                first = (kind, name) not in server.first
                server.first.add((kind, name))
                if kind in ("broken", "stall") and first:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    if kind == "stall":
                        time.sleep(3)
                    self.close_connection = True
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and kind != "norange":
                    start = int(rng.split("=")[1].rstrip("-"))
                    if start >= len(data):
                        return self.send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    return self.send(206, data[start:], {
                        "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                self.send(200, data, {})

            def send(self, code, body, headers):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download():
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    os.environ["no_proxy"] = "127.0.0.1,localhost"
    download.NETWORK_TIMEOUT = 1
    download.RETRY_WAIT = 0
    server = Server()
    try:
        payload = random.Random(7).randbytes(300_000)
        digest = hashlib.sha256(payload).hexdigest()
        for name in ("a.bin", "b.bin", "c.bin", "d.bin", "e.bin", "f.bin", "g.bin"):
            server.files[name] = payload
        folder = os.path.join(TMP, "downloads")

        def target(name):
            return os.path.join(folder, name)

        def fetch(url, name, **kw):
            try:
                download.download(url, target(name), **kw)
                return None
            except download.DownloadError as e:
                return str(e)

        error = fetch(f"{server.url}/a.bin", "a.bin", sha256=digest, size=len(payload))
        check("download: complete, sha256 and size checked, .part renamed",
              error is None and open(target("a.bin"), "rb").read() == payload
              and not os.path.exists(target("a.bin") + ".part"), error)

        error = fetch(f"{server.url}/b.bin", "b.bin", sha256="0" * 64)
        check("download: a sha256 mismatch is refused, the .part deleted",
              error is not None and "sha256" in error and not os.path.exists(target("b.bin"))
              and not os.path.exists(target("b.bin") + ".part"), error)

        error = fetch(f"{server.url}/c.bin", "c.bin", size=len(payload) + 1)
        check("download: a size mismatch is refused", error is not None and "bytes" in error
              and not os.path.exists(target("c.bin")), error)

        server.requests.clear()
        error = fetch(f"{server.url}/broken/d.bin", "d.bin", sha256=digest)
        ranges = [r for p, r in server.requests if p.endswith("d.bin")]
        check("download: connection closed mid-file, the next try sends Range and completes",
              error is None and open(target("d.bin"), "rb").read() == payload
              and ranges == [None, f"bytes={len(payload) // 2}-"], f"{error}, ranges {ranges}")

        error = fetch(f"{server.url}/broken/e.bin", "e.bin", sha256=digest, attempts=1)
        part = target("e.bin") + ".part"
        kept = os.path.exists(part) and os.path.getsize(part) == len(payload) // 2
        check("download: a broken run keeps its .part", error is not None and kept, error)
        server.requests.clear()
        error = fetch(f"{server.url}/broken/e.bin", "e.bin", sha256=digest, attempts=1)
        check("download: the next run resumes the .part with Range",
              error is None and open(target("e.bin"), "rb").read() == payload
              and server.requests == [("/broken/e.bin", f"bytes={len(payload) // 2}-")],
              f"{error}, {server.requests}")

        t0 = time.time()
        error = fetch(f"{server.url}/stall/f.bin", "f.bin", sha256=digest)
        check("download: a stalled connection times out and resumes",
              error is None and open(target("f.bin"), "rb").read() == payload
              and time.time() - t0 < 10, f"{error}, {time.time() - t0:.1f} s")

        with open(target("g.bin") + ".part", "wb") as f:
            f.write(b"x" * 1000)  # a server that ignores Range: start over
        error = fetch(f"{server.url}/norange/g.bin", "g.bin", sha256=digest)
        check("download: a server that ignores Range gives a fresh, correct copy",
              error is None and open(target("g.bin"), "rb").read() == payload, error)

        error = fetch(f"{server.url}/missing.bin", "missing.bin")
        check("download: HTTP 404 fails at once with the URL",
              error is not None and "404" in error and "missing.bin" in error, error)

        # WikiText through the mirrors: a zip in the original layout, sha256 checked
        buffer = io.BytesIO()
        raw = {s: f" \n = {s.title()} = \n \n text of {s} \n".encode() for s in download.WIKITEXT_SPLITS}
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            for s, data in raw.items():
                z.writestr(f"wikitext-103-raw/wiki.{s}.raw", data)
        server.files["wikitext-103-raw-v1.zip"] = buffer.getvalue()
        saved = (download.WIKITEXT_MIRRORS, download.WIKITEXT["wikitext-103"], download.HF_API)
        download.WIKITEXT_MIRRORS = [f"{server.url}/nothing-here/", f"{server.url}/"]
        download.WIKITEXT["wikitext-103"] = dict(saved[1], size=len(buffer.getvalue()),
                                                 sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
        download.HF_API = server.url + "/api?{config}"
        try:
            out = os.path.join(TMP, "wt103")
            raw_dir, files = prepare.wikitext_source("wikitext-103", out, offline=False)
            check("wikitext-103: zip from the second mirror, unpacked, train/valid used",
                  files == {"train": "train", "val": "valid"} and all(
                      open(os.path.join(raw_dir, f"wiki.{s}.raw"), "rb").read() == raw[s]
                      for s in raw))
            raw_dir2, _ = prepare.wikitext_source("wikitext-103", out, offline=False)
            check("wikitext-103: a second run uses the earlier download", raw_dir2 == raw_dir)
            hand = os.path.join(TMP, "wt103-hand", "raw")
            os.makedirs(hand)
            with open(os.path.join(hand, "wikitext-103-raw-v1.zip"), "wb") as f:
                f.write(buffer.getvalue())
            download.WIKITEXT_MIRRORS = ["http://127.0.0.1:9/"]  # nothing listens there
            raw_dir4, _ = prepare.wikitext_source("wikitext-103", os.path.dirname(hand), False)
            check("wikitext-103: a zip put into <out-dir>/raw by hand is checked and unpacked",
                  raw_dir4 == hand and os.path.isfile(os.path.join(hand, "wiki.train.raw")))
            download.WIKITEXT["wikitext-103"]["sha256"] = "0" * 64
            download.WIKITEXT_MIRRORS = [f"{server.url}/"]
            out = os.path.join(TMP, "wt103-bad")
            try:
                import pyarrow.parquet
                has_pyarrow = pyarrow.parquet is not None
            except ImportError:
                has_pyarrow = False
            buffer_out = io.StringIO()
            stdout, sys.stdout = sys.stdout, buffer_out
            try:
                raw_dir3, files = prepare.wikitext_source("wikitext-103", out, offline=False)
            finally:
                sys.stdout = stdout
            log = buffer_out.getvalue()
            check("wikitext-103: a corrupt zip is refused; falls back to local files, says so",
                  "sha256" in log and "offline" in log and raw_dir3 != os.path.join(out, "raw")
                  and (has_pyarrow or "pyarrow" in log), log)
            test_parquet(server, has_pyarrow)
        finally:
            download.WIKITEXT_MIRRORS, download.WIKITEXT["wikitext-103"], download.HF_API = saved
    finally:
        server.close()


def test_parquet(server, has_pyarrow):
    """The Hugging Face fallback, with pyarrow (skipped without it): parquet files as the
    hub has them (a row per line, blank lines as ""), listed with their sha256, become
    the raw files byte for byte."""
    if not has_pyarrow:
        print("skip wikitext-103: the Hugging Face parquet fallback (no pyarrow here)")
        return
    import pyarrow
    import pyarrow.parquet
    config = "wikitext-103-raw-v1"
    raw = {}
    for split in ("valid", "test"):
        with open(os.path.join(WIKITEXT_DIR, f"wiki.{split}.raw"), encoding="utf-8", newline="") as f:
            raw[split] = f.read()
    raw["train"] = raw["test"]
    lines = {s: [line if line.strip() else "" for line in t.splitlines(keepends=True)]
             for s, t in raw.items()}
    half = len(lines["train"]) // 2
    files = {"train-00000-of-00002.parquet": lines["train"][:half],
             "train-00001-of-00002.parquet": lines["train"][half:],
             "validation-00000-of-00001.parquet": lines["valid"],
             "test-00000-of-00001.parquet": lines["test"]}
    listing = []
    for name, rows in files.items():
        buffer = io.BytesIO()
        pyarrow.parquet.write_table(pyarrow.table({"text": rows}), buffer)
        data = buffer.getvalue()
        server.files[name] = data
        listing.append({"type": "file", "path": f"{config}/{name}", "size": len(data),
                        "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}})
    server.api = json.dumps(listing).encode()
    download.WIKITEXT_MIRRORS = ["http://127.0.0.1:9/"]  # no zip
    saved = download.HF_FILE
    download.HF_FILE = server.url + "/{config}/{name}"
    try:
        raw_dir, split_files = prepare.wikitext_source("wikitext-103", os.path.join(TMP, "hf"), False)
    finally:
        download.HF_FILE = saved
    same = all(open(os.path.join(raw_dir, f"wiki.{s}.raw"), encoding="utf-8", newline="").read()
               == raw[s] for s in raw)
    check("wikitext-103: the Hugging Face parquet files (sha256 checked) become the raw "
          "files byte for byte", same and split_files == {"train": "train", "val": "valid"})


# ----------------------------------------------------------------------------


def main():
    global TMP
    t0 = time.time()
    TMP = tempfile.mkdtemp(prefix="dstrain-test-data-")
    try:
        missing = [p for p in (os.path.join(SHARED, "gpt2", "vocab.bpe"),
                               os.path.join(SHARED, "gpt2", "encoder.json"),
                               os.path.join(WIKITEXT_DIR, "wiki.valid.raw"),
                               os.path.join(WIKITEXT_DIR, "wiki.test.raw"),
                               os.path.join(SHARED, "tinyshakespeare", "input.txt"))
                   if not os.path.isfile(p)]
        check("local data present", not missing, f"missing {missing}")
        if missing:
            return
        ref = reference_encoding(TMP)
        stdout, sys.stdout = sys.stdout, io.StringIO()  # prepare.py's "tokenizer: ..." line
        try:
            encoding, _ = prepare.gpt2_encoding()
        finally:
            sys.stdout = stdout
        for test in (test_articles, lambda: test_safe_cuts(ref), lambda: test_tokens(ref, encoding),
                     lambda: test_prepare_command(ref), lambda: test_shard_sizes(encoding),
                     lambda: test_text_and_dir(ref), test_model_tokenizers, test_download):
            try:
                test()
            except Exception as e:  # a crash in one group fails it, the others still run
                import traceback
                traceback.print_exc()
                check(f"{getattr(test, '__name__', 'test')} ran to the end", False, repr(e))
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
        print(f"({time.time() - t0:.1f} s)")
    sys.exit(summary())


if __name__ == "__main__":
    main()
