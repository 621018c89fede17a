"""
Tokenization throughput of data/prepare.py against tiktoken called directly, on the same
text in the same run, with 1 worker and with every core. Called by dev/bench/data.sh.

    python3 dev/bench/data_tokenize.py [--copies 4] [--workers N] [--repeats 7]

The text is the local WikiText valid and test splits (../shared/data/wikitext), repeated
--copies times into a temporary file, cut into articles as prepare.py cuts them. Every
variant tokenizes the same articles (tiktoken gets them as strings; prepare.py reads them
from the file, as it does when it prepares data). Each figure is the best of --repeats
rounds, each round running every variant in turn (the machine may be shared). MB are
10^6 bytes of UTF-8 text. "MB/cpu-s" divides by the CPU time of this process and its
worker processes: on a machine that other jobs keep busy, wall-clock scaling says
little, while MB per CPU-second still shows what parallelism costs. The variants:
  tiktoken encode_ordinary      one call per article, on this thread
  tiktoken encode_ordinary_batch  tiktoken's own thread pool (num_threads=N), which
                                returns lists of ints
  prepare.py (processes)        prepare.tokenize: tasks of ~1 MB (byte ranges of the file)
                                on N worker processes (in-process for N=1), uint16 bytes
                                out, checked equal to tiktoken's tokens
  prepare.py tasks on threads   the same tasks on a pool of N threads (the alternative
                                that prepare.py does not use)
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "data"))
import prepare  # noqa: E402

SHARED = os.path.join(prepare.SHARED_DATA, "wikitext")


def cpu_seconds():
    """User + system CPU time of this process and of its finished child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=prepare.default_workers())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    encoding, _ = prepare.gpt2_encoding()
    tmp = tempfile.mkdtemp(prefix="dstrain-bench-")
    path = os.path.join(tmp, "text.raw")
    with open(path, "wb") as out:
        for _ in range(args.copies):
            for split in ("valid", "test"):
                with open(os.path.join(SHARED, f"wiki.{split}.raw"), "rb") as f:
                    out.write(f.read())
    articles = prepare.read_documents(path, "wikitext")
    files = [(path, prepare.document_starts(path, "wikitext"))]
    nbytes = os.path.getsize(path)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"text: {len(articles)} articles, {nbytes / 1e6:.1f} MB (WikiText valid+test x "
          f"{args.copies}); {args.workers} cores available; load average {load:.2f} before")

    reference = []
    for article in articles:
        reference.append(prepare.EOT)
        reference += encoding.encode_ordinary(article)
    reference = prepare.little_endian(prepare.array("H", reference))

    def tiktoken_single():
        return sum(len(encoding.encode_ordinary(a)) for a in articles)

    def tiktoken_batch(n):
        return lambda: sum(map(len, encoding.encode_ordinary_batch(articles, num_threads=n)))

    gpt2 = prepare.GPT2Tokenizer(encoding)

    def ours(n):
        def run():
            data = b"".join(d for d, _ in prepare.tokenize(gpt2, files, 0, len(articles), n))
            assert data == reference, "prepare.py's tokens differ from tiktoken's"
            return len(data) // 2 - len(articles)  # without the EOT tokens, like tiktoken's
        return run

    def ours_threads(n):
        def run():
            prepare.set_tokenizer(gpt2)
            tasks = prepare.make_tasks(prepare.segments(files, 0, len(articles), prepare.TASK_BYTES),
                                       prepare.TASK_BYTES)
            with ThreadPoolExecutor(n) as pool:
                data = b"".join(d for d, _ in pool.map(prepare.encode_task, tasks))
            assert data == reference, "prepare.py's tokens differ from tiktoken's"
            return len(data) // 2 - len(articles)
        return run

    variants = [
        ("tiktoken encode_ordinary", 1, tiktoken_single),
        ("tiktoken encode_ordinary_batch", 1, tiktoken_batch(1)),
        ("tiktoken encode_ordinary_batch", args.workers, tiktoken_batch(args.workers)),
        ("prepare.py (processes)", 1, ours(1)),
        ("prepare.py (processes)", args.workers, ours(args.workers)),
        ("prepare.py tasks on threads", 1, ours_threads(1)),
        ("prepare.py tasks on threads", args.workers, ours_threads(args.workers)),
    ]
    print(f"\n{'tokenizer':34s} {'cores':>5s} {'MB/s':>7s} {'Mtokens/s':>10s} {'vs 1 core':>9s} "
          f"{'MB/cpu-s':>9s}")
    # rounds interleave the variants, so a burst of load from other jobs hits them all
    best = [float("inf")] * len(variants)
    best_cpu = [float("inf")] * len(variants)
    tokens = [0] * len(variants)
    for _ in range(args.repeats):
        for i, (_, _, run) in enumerate(variants):
            t0, c0 = time.perf_counter(), cpu_seconds()
            tokens[i] = run()
            best[i] = min(best[i], time.perf_counter() - t0)
            best_cpu[i] = min(best_cpu[i], cpu_seconds() - c0)
    single = {label: best[i] for i, (label, cores, _) in enumerate(variants) if cores == 1}
    for i, (label, cores, _) in enumerate(variants):
        speedup = f"{single[label] / best[i]:.2f}x"
        print(f"{label:34s} {cores:5d} {nbytes / 1e6 / best[i]:7.2f} "
              f"{tokens[i] / 1e6 / best[i]:10.2f} {speedup:>9s} {nbytes / 1e6 / best_cpu[i]:9.2f}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"(load average {load:.2f} after; best of {args.repeats} rounds)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
