/*
Throughput of dstrain's data loader (dstrain.h): batches per second that dataloader_next
hands out, with nothing else running, for the micro batch shapes that the trainers use.

    gcc -O2 -fopenmp dev/bench/loader_bench.c -lm -o loader_bench
    ./loader_bench [PATTERN] [SECONDS]

PATTERN is a glob of token shards (default data/wikitext/wikitext_train_*.bin, which
`python3 data/prepare.py` writes); SECONDS is the time spent on each shape (default 2).
The loader runs as in training: shuffled order (seed 1337), one rank, a global batch of
one micro batch, sequences copied by OpenMP threads. Called by dev/bench/data.sh.
*/
#include "../../dstrain.h"

int main(int argc, char** argv) {
    const char* pattern = argc > 1 ? argv[1] : "data/wikitext/wikitext_train_*.bin";
    double seconds = argc > 2 ? atof(argv[2]) : 2.0;
    const int shapes[][2] = {{4, 64}, {16, 1024}};
    printf("%-12s %10s %12s %14s %12s\n", "B x T", "batches", "batches/s", "tokens/s", "us/batch");
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int B = shapes[s][0], T = shapes[s][1];
        DataLoader L;
        char err[1024];
        if (dataloader_init(&L, pattern, B, T, 0, 1, (size_t)B, 1, 1337, GPT2_VOCAB_SIZE, err, sizeof(err))) {
            fprintf(stderr, "error: %s\n", err);
            return 1;
        }
        for (int i = 0; i < 16; i++) dataloader_next(&L);  // warm up: page in the shards
        long long batches = 0, checksum = 0;
        double t0 = wall_seconds(), elapsed = 0;
        while (elapsed < seconds) {
            for (int i = 0; i < 64; i++) {
                dataloader_next(&L);
                checksum += L.inputs[0] + L.targets[(size_t)B * T - 1];
            }
            batches += 64;
            elapsed = wall_seconds() - t0;
        }
        char shape[32];
        snprintf(shape, sizeof(shape), "%d x %d", B, T);
        printf("%-12s %10lld %12.0f %14.3g %12.1f\n", shape, batches, batches / elapsed,
               (double)batches * B * T / elapsed, 1e6 * elapsed / batches);
        if (checksum == 42) printf(" ");  // keeps the loop's reads
        dataloader_free(&L);
    }
    return 0;
}
