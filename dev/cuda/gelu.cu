/*
GELU (tanh approximation) forward and backward against the CPU trainer's gelu_forward /
gelu_backward, then a benchmark at GPT-2 124M's shape (B 16, T 1024, 4C = 3072).

    make dev/cuda/gelu && ./dev/cuda/gelu
*/
#include "common.h"

static void check_size(size_t N) {
    printf("N %zu\n", N);
    float *inp = random_values(N, -6, 6, 1), *dout = random_values(N, -1, 1, 2);
    floatX *d_inp = device_floatX(inp, N), *d_d = device_floatX(dout, N), *d_out;
    cudaCheck(cudaMalloc(&d_out, N * sizeof(floatX)));
    gelu_forward(d_out, d_inp, N);
    gelu_backward(d_d, d_inp, N);
    float *out = (float*)mallocCheck(N * sizeof(float)), *dinp = (float*)callocCheck(N, sizeof(float));
    cpu::gelu_forward(out, inp, N);
    cpu::gelu_backward(dinp, inp, dout, N);
    float *g_out = host_float(d_out, N), *g_dinp = host_float(d_d, N);
    // a few fp32 operations per element (tanhf is within 2 ulp): 8 ulps of fp32, one rounding to floatX
    check("forward: out", g_out, out, N, tolerance(1, 0, 8));
    check("backward: dinp (in place)", g_dinp, dinp, N, tolerance(1, 0, 8));
    free(inp); free(dout); free(out); free(dinp); free(g_out); free(g_dinp);
    void* d[] = {d_inp, d_d, d_out};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("gelu");
    check_size(1 << 20);
    check_size(64 * 256);
    size_t N = (size_t)16 * 1024 * 3072;
    printf("benchmark: N %zu\n", N);
    floatX *a, *b;
    cudaCheck(cudaMalloc(&a, N * sizeof(floatX)));
    cudaCheck(cudaMalloc(&b, N * sizeof(floatX)));
    cudaCheck(cudaMemset(a, 0, N * sizeof(floatX)));
    cudaCheck(cudaMemset(b, 0, N * sizeof(floatX)));
    report("gelu_forward", bench_ms(20, [&] { gelu_forward(b, a, N); }), 2.0 * N * sizeof(floatX), 0);
    report("gelu_backward", bench_ms(20, [&] { gelu_backward(b, a, N); }), 3.0 * N * sizeof(floatX), 0);
    cudaCheck(cudaFree(a));
    cudaCheck(cudaFree(b));
    return finish();
}
