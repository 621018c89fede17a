/*
dev/cuda/common.h: what the kernel checks share. Each dev/cuda/<kernel>.cu includes the GPU
trainer (train_gpt.cu, with TESTING: no main) for its kernels and launchers, and the CPU
trainer (train_gpt.c, inside namespace cpu) for the reference: every kernel is checked
against the function the CPU trainer itself runs, with no copy of either.

Inputs are rounded to floatX before the CPU sees them, so both sides start from the same
values and only the kernel's own arithmetic is measured.

Error measure: max |gpu - cpu| / max |cpu| over the tensor, failing on any NaN or inf
(tests/compare.h, as test_gpt.c).
Tolerance: tolerance(roundings, rounded_terms, fp32_terms) =
    u (roundings + sqrt(rounded_terms)) + 2 fp32_terms 2^-24
  - u: floatX's unit roundoff (fp32 2^-24, fp16 2^-11, bf16 2^-8); each rounding of the
    result (or of a value it is a function of) to floatX adds at most u;
  - rounded_terms: how many terms rounded to floatX one at a time (attention's P and dS)
    a result sums; independent rounding errors grow like the square root of their number;
  - fp32_terms: the length of the longest fp32 sum; both sides' sums are within the
    worst-case bound n 2^-24 of the exact one (relative to the sum of magnitudes).
*/
#ifndef DEV_CUDA_COMMON_H
#define DEV_CUDA_COMMON_H
#define TESTING
#include "../../train_gpt.cu"
#include "../../tests/compare.h"
namespace cpu {
#include "../../train_gpt.c"
}

static double unit_roundoff(void) {
    if (sizeof(floatX) == sizeof(float)) return ldexp(1.0, -24);
    return strcmp(PRECISION_NAME, "fp16") == 0 ? ldexp(1.0, -11) : ldexp(1.0, -8);
}

static double tolerance(int roundings, size_t rounded_terms, size_t fp32_terms) {
    return unit_roundoff() * (roundings + sqrt((double)rounded_terms)) + 2.0 * fp32_terms * ldexp(1.0, -24);
}

// n values uniform in [lo, hi), rounded to floatX (exactly what the GPU will read)
static float* random_values(size_t n, float lo, float hi, uint64_t seed) {
    Rng r;
    rng_seed(&r, seed);
    float* p = (float*)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = to_float(to_floatX(lo + (hi - lo) * rng_uniform(&r)));
    return p;
}

static int* random_tokens(size_t n, int V, uint64_t seed) {
    Rng r;
    rng_seed(&r, seed);
    int* p = (int*)mallocCheck(n * sizeof(int));
    for (size_t i = 0; i < n; i++) p[i] = (int)rng_below(&r, (uint64_t)V);
    return p;
}

static floatX* device_floatX(const float* h, size_t n) {
    floatX* tmp = (floatX*)mallocCheck(n * sizeof(floatX));
    for (size_t i = 0; i < n; i++) tmp[i] = to_floatX(h[i]);
    floatX* d;
    cudaCheck(cudaMalloc(&d, n * sizeof(floatX)));
    cudaCheck(cudaMemcpy(d, tmp, n * sizeof(floatX), cudaMemcpyHostToDevice));
    free(tmp);
    return d;
}

template <typename T> static T* device_copy(const T* h, size_t n) {
    T* d;
    cudaCheck(cudaMalloc(&d, n * sizeof(T)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

// host fp32 copy of a device floatX or fp32 tensor (malloc'd)
static float* host_float(const floatX* d, size_t n) {
    cudaCheck(cudaDeviceSynchronize());
    floatX* tmp = (floatX*)mallocCheck(n * sizeof(floatX));
    cudaCheck(cudaMemcpy(tmp, d, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    float* h = (float*)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = to_float(tmp[i]);
    free(tmp);
    return h;
}

#if !defined(ENABLE_FP32) // in the FP32 build floatX is float and the overload above serves
static float* host_float(const float* d, size_t n) {
    cudaCheck(cudaDeviceSynchronize());
    float* h = (float*)mallocCheck(n * sizeof(float));
    cudaCheck(cudaMemcpy(h, d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}
#endif

static int checks_failed = 0;

// compares n values (rows of `cols` with strides, for padded tensors) and prints the verdict;
// a NaN or inf on either side fails (tests/compare.h)
static void check_strided(const char* what, const float* gpu, const float* cpu, size_t rows, size_t cols, size_t gpu_stride, size_t cpu_stride, double tol) {
    char why[256];
    int ok = tensor_within(tensor_err_strided(gpu, cpu, rows, cols, gpu_stride, cpu_stride), tol, why, sizeof why);
    printf("  %-4s %-44s %s\n", ok ? "ok" : "FAIL", what, why);
    checks_failed += !ok;
}

static void check(const char* what, const float* gpu, const float* cpu, size_t n, double tol) { check_strided(what, gpu, cpu, 1, n, 0, 0, tol); }

// Mean milliseconds of fn() over `reps` runs on the trainer's stream, each after the L2
// cache was flushed (so every run reads its inputs from memory, as in training).
template <typename F> static double bench_ms(int reps, F fn) {
    static char* flush = NULL;
    size_t flush_bytes = 2 * (size_t)device_prop.l2CacheSize;
    if (!flush) cudaCheck(cudaMalloc(&flush, flush_bytes));
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    fn(); // warm-up: plans, caches of the driver
    double total = 0.0;
    for (int i = 0; i < reps; i++) {
        cudaCheck(cudaMemsetAsync(flush, i & 0xff, flush_bytes, stream));
        cudaCheck(cudaEventRecord(start, stream));
        fn();
        cudaCheck(cudaEventRecord(stop, stream));
        cudaCheck(cudaEventSynchronize(stop));
        float ms;
        cudaCheck(cudaEventElapsedTime(&ms, start, stop));
        total += ms;
    }
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return total / reps;
}

// "  bench <what>: 1.234 ms, 1234 GB/s" (bytes moved) or TFLOP/s (flops), either may be 0
static void report(const char* what, double ms, double bytes, double flops) {
    printf("  bench %-42s %8.3f ms", what, ms);
    if (bytes > 0) printf("  %7.0f GB/s", bytes / (ms * 1e-3) / 1e9);
    if (flops > 0) printf("  %7.1f TFLOP/s", flops / (ms * 1e-3) / 1e12);
    printf("\n");
}

static void print_header(const char* kernel) {
    cuda_setup();
    printf("%s (%s) on %s\n", kernel, PRECISION_NAME, device_prop.name);
}

// the exit status: 0 if every check passed
static int finish(void) {
    printf("%s\n", checks_failed ? "FAIL" : "PASS");
    return checks_failed ? 1 : 0;
}
#endif
