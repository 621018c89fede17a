/*
dev/cpu/matmul.c: the CPU trainer's fast matmul (train_gpt.c, section "fast matmul") against
the plain loops of its section "matmul", for odd and GPT-2 shapes, with 1 and all threads
(the results must be the same bits), and a benchmark of each GPT-2 124M shape and of one
training step's matmuls.

    gcc -O3 -march=native -fopenmp dev/cpu/matmul.c -o /tmp/matmul_bench -lm
    OMP_NUM_THREADS=2 /tmp/matmul_bench [BT]

Error measure: max |fast - plain| / max |plain|. Both sum K products in fp32 in different
orders; with random inputs the rounding errors of a sum grow like sqrt(K) u (u = 2^-24), so
the bound is tolerance(K) = 4 sqrt(K) u (observed: up to 0.6 sqrt(K) u, at K = 50304).
*/
#define TESTING
#include "../../train_gpt.c"
// ----------------------------------------------------------------------------
// checks against the plain loops, and a benchmark of the GPT-2 124M shapes
#include <math.h>

static float* rand_array(long n, unsigned* seed) {  // uniform in [-1, 1)
    float* x = malloc(n * sizeof(float));
    for (long i = 0; i < n; i++) {
        *seed = *seed * 1664525u + 1013904223u;
        x[i] = (*seed >> 8) / 8388608.0f - 1.0f;
    }
    return x;
}

static float* copy_array(const float* x, long n) { return memcpy(malloc(n * sizeof(float)), x, n * sizeof(float)); }

// max |a - ref| / max |ref|; infinite when a holds a NaN or inf, which fmax would skip
static double rel_error(const float* a, const float* ref, long n) {
    double err = 0, mag = 0;
    for (long i = 0; i < n; i++) {
        if (!isfinite(a[i])) return INFINITY;
        err = fmax(err, fabs((double)a[i] - ref[i]));
        mag = fmax(mag, fabs(ref[i]));
    }
    return err / mag;
}

static double tolerance(int K) { return 4.0 * sqrt((double)K) * ldexp(1.0, -24); }

static int check(int BT, int C, int OC) {
    unsigned seed = 42 + BT + C + OC;
    float* inp = rand_array((long)BT * C, &seed);
    float* weight = rand_array((long)OC * C, &seed);
    float* bias = rand_array(OC, &seed);
    float* dout = rand_array((long)BT * OC, &seed);
    float* out = rand_array((long)BT * OC, &seed);  // garbage, must be overwritten
    float* dinp = rand_array((long)BT * C, &seed);  // gradients are accumulated into
    float* dweight = rand_array((long)OC * C, &seed);
    float* dbias = rand_array(OC, &seed);
    float* ref_out = malloc(sizeof(float) * BT * OC);
    float* ref_dinp = copy_array(dinp, (long)BT * C);
    float* ref_dweight = copy_array(dweight, (long)OC * C);
    float* ref_dbias = malloc(sizeof(float) * OC);  // bias_backward has no second version: a sum in double
    matmul_forward_naive(ref_out, inp, weight, bias, BT, C, OC);
    matmul_backward_input_naive(ref_dinp, dout, weight, BT, C, OC);
    matmul_backward_weight_naive(ref_dweight, dout, inp, BT, C, OC);
    for (int o = 0; o < OC; o++) {
        double sum = dbias[o];
        for (int b = 0; b < BT; b++) sum += dout[(long)b * OC + o];
        ref_dbias[o] = (float)sum;
    }
    // the gradients are computed twice from the same start, with 1 thread and with all of them:
    // the bits must be the same
    float* dinp1 = copy_array(dinp, (long)BT * C);
    float* dweight1 = copy_array(dweight, (long)OC * C);
    int nthreads = omp_get_max_threads();
    omp_set_num_threads(1);
    matmul_backward_input(dinp1, dout, weight, BT, C, OC);
    matmul_backward_weight(dweight1, dout, inp, BT, C, OC);
    omp_set_num_threads(nthreads);
    matmul_forward(out, inp, weight, bias, BT, C, OC);
    matmul_backward_input(dinp, dout, weight, BT, C, OC);
    matmul_backward_weight(dweight, dout, inp, BT, C, OC);
    bias_backward(dbias, dout, BT, OC);
    double e_out = rel_error(out, ref_out, (long)BT * OC), e_dinp = rel_error(dinp, ref_dinp, (long)BT * C);
    double e_dw = rel_error(dweight, ref_dweight, (long)OC * C), e_db = rel_error(dbias, ref_dbias, OC);
    int same = !memcmp(dinp, dinp1, sizeof(float) * BT * C) && !memcmp(dweight, dweight1, sizeof(float) * OC * C);
    int ok = e_out <= tolerance(C) && e_dinp <= tolerance(OC) && e_dw <= tolerance(BT) && e_db <= tolerance(BT) && same;
    printf("BT=%4d C=%4d OC=%5d  rel. error: out %.1e dinp %.1e dweight %.1e dbias %.1e  %s threads  %s\n",
           BT, C, OC, e_out, e_dinp, e_dw, e_db, same ? "same bits with 1 and all" : "DIFFERENT bits for 1 and all",
           ok ? "OK" : "FAIL");
    free(inp); free(weight); free(bias); free(dout); free(out); free(dinp); free(dweight); free(dbias);
    free(ref_out); free(ref_dinp); free(ref_dweight); free(ref_dbias); free(dinp1); free(dweight1);
    return ok;
}

static int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

// Times matmul_forward or the three backward products on L sets of buffers, one per layer of the model, in turn: like
// in a training step the weights and gradients are not in the caches (all 12 layers are ~340 MB, the
// classifier alone ~400 MB). Every call is timed; gives the fastest and the median call in ms.
static void bench(int BT, int C, int OC, int backward, int L, int reps, double* best, double* median) {
    unsigned seed = 1;
    float *inp[12], *weight[12], *bias[12], *dout[12], *out[12], *dinp[12], *dweight[12], *dbias[12];
    for (int l = 0; l < L; l++) {
        inp[l] = rand_array((long)BT * C, &seed);
        weight[l] = rand_array((long)OC * C, &seed);
        bias[l] = rand_array(OC, &seed);
        dout[l] = rand_array((long)BT * OC, &seed);
        out[l] = calloc((long)BT * OC, sizeof(float));
        dinp[l] = calloc((long)BT * C, sizeof(float));
        dweight[l] = calloc((long)OC * C, sizeof(float));
        dbias[l] = calloc(OC, sizeof(float));
    }
    double times[256];
    int n = 0;
    for (int r = -1; r < reps; r++)  // r = -1: warm up
        for (int l = 0; l < L; l++) {
            double t0 = omp_get_wtime();
            if (backward) {
                matmul_backward_input(dinp[l], dout[l], weight[l], BT, C, OC);
                matmul_backward_weight(dweight[l], dout[l], inp[l], BT, C, OC);
                bias_backward(dbias[l], dout[l], BT, OC);
            } else matmul_forward(out[l], inp[l], weight[l], bias[l], BT, C, OC);
            if (r >= 0 && n < 256) times[n++] = (omp_get_wtime() - t0) * 1e3;
        }
    qsort(times, n, sizeof(double), cmp_double);
    *best = times[0];
    *median = times[n / 2];
    for (int l = 0; l < L; l++) {
        free(inp[l]); free(weight[l]); free(bias[l]); free(dout[l]);
        free(out[l]); free(dinp[l]); free(dweight[l]); free(dbias[l]);
    }
}

int main(int argc, char** argv) {
    int BT = argc > 1 ? atoi(argv[1]) : 256;
    printf("OpenMP threads: %d\n", omp_get_max_threads());
    int ok = 1;
    int tests[][3] = {{7, 13, 29}, {1, 1, 1}, {33, 97, 65}, {300, 1000, 333}, {256, 64, 50304}, {256, 64, 192},
                      {256, 768, 2304}, {BT, 3072, 768}};
    for (int i = 0; i < (int)(sizeof(tests) / sizeof(tests[0])); i++) ok &= check(tests[i][0], tests[i][1], tests[i][2]);

    // GPT-2 124M: per layer qkv, attention projection, fc, fc projection; then the classifier (no bias)
    struct { const char* name; int C, OC, count; } shapes[] = {
        {"qkv", 768, 2304, 12}, {"attproj", 768, 768, 12}, {"fc", 768, 3072, 12}, {"fcproj", 3072, 768, 12},
        {"classifier", 768, 50304, 1}};
    double total_best = 0, total_median = 0;
    printf("benchmark, BT = %d (fastest call / median call):\n", BT);
    for (int s = 0; s < 5; s++) {
        int C = shapes[s].C, OC = shapes[s].OC, L = shapes[s].count;
        double flops = 2.0 * BT * C * OC, fb, fm, bb, bm;
        bench(BT, C, OC, 0, L, L == 1 ? 5 : 3, &fb, &fm);
        bench(BT, C, OC, 1, L, L == 1 ? 5 : 3, &bb, &bm);
        printf("%-10s %4d -> %5d  forward %7.2f ms %5.0f GFLOP/s (median %7.2f)  backward %7.2f ms %5.0f GFLOP/s (median %7.2f)\n",
               shapes[s].name, C, OC, fb, flops / fb * 1e-6, fm, bb, 2 * flops / bb * 1e-6, bm);
        total_best += L * (fb + bb);
        total_median += L * (fm + bm);
    }
    printf("one GPT-2 124M training step's matmuls (12 layers x 4 + classifier, fwd + bwd): %.0f ms (median %.0f ms)\n",
           total_best, total_median);
    printf("%s\n", ok ? "all checks OK" : "SOME CHECKS FAILED");
    return !ok;
}
