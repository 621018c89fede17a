/*
RMSNorm forward and backward against the CPU trainer's rmsnorm_forward / rmsnorm_backward,
then a benchmark at DeepSeek-Coder 1.3B's shape (B 4, T 2048, C 2048).

    make dev/cuda/rmsnorm_bf16 && ./dev/cuda/rmsnorm_bf16
*/
#include "common.h"

static void check_size(int N, int C, float eps) {
    printf("N %d, C %d, eps %g\n", N, C, eps);
    size_t NC = (size_t)N * C;
    float *inp = random_values(NC, -2, 2, 1), *w = random_values(C, 0.5f, 1.5f, 2);
    float *dout = random_values(NC, -1, 1, 3), *dinp = random_values(NC, -1, 1, 4); // backward adds into dinp
    floatX *d_inp = device_floatX(inp, NC), *d_w = device_floatX(w, C), *d_dout = device_floatX(dout, NC), *d_dinp = device_floatX(dinp, NC), *d_out;
    float *d_rstd, *d_dw, *d_scratch;
    cudaCheck(cudaMalloc(&d_out, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_rstd, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_scratch, column_sums_scratch_floats(N, C) * sizeof(float)));
    float *out = (float*)mallocCheck(NC * sizeof(float)), *rstd = (float*)mallocCheck(N * sizeof(float));
    rmsnorm_forward(d_out, d_rstd, d_inp, d_w, N, C, eps);
    cpu::rmsnorm_forward(out, rstd, inp, w, N, C, eps);
    float *g_out = host_float(d_out, NC), *g_rstd = host_float(d_rstd, N);
    // an fp32 sum of C squares, then one rounding of the output to floatX
    check("forward: out", g_out, out, NC, tolerance(1, 0, C));
    check("forward: rstd", g_rstd, rstd, N, tolerance(0, 0, C));

    float* dw = (float*)callocCheck(C, sizeof(float));
    d_dw = device_copy(dw, C);
    rmsnorm_backward(d_dinp, d_dw, d_dout, d_inp, d_w, d_rstd, N, C, d_scratch);
    cpu::rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, C);
    float *g_dinp = host_float(d_dinp, NC), *g_dw = host_float(d_dw, C);
    check("backward: dinp (accumulated)", g_dinp, dinp, NC, tolerance(1, 0, C));
    check("backward: dweight", g_dw, dw, C, tolerance(0, 0, N));
    free(inp); free(w); free(dout); free(dinp); free(out); free(rstd); free(dw); free(g_out); free(g_rstd); free(g_dinp); free(g_dw);
    void* d[] = {d_inp, d_w, d_dout, d_dinp, d_out, d_rstd, d_dw, d_scratch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

static void benchmark(int N, int C) {
    printf("benchmark: N %d, C %d\n", N, C);
    size_t NC = (size_t)N * C;
    floatX *d_inp, *d_out, *d_w;
    float *d_rstd, *d_dw, *d_scratch;
    cudaCheck(cudaMalloc(&d_inp, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_out, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_w, C * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_rstd, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_dw, C * sizeof(float)));
    cudaCheck(cudaMalloc(&d_scratch, column_sums_scratch_floats(N, C) * sizeof(float)));
    cudaCheck(cudaMemset(d_inp, 0, NC * sizeof(floatX)));
    cudaCheck(cudaMemset(d_w, 0, C * sizeof(floatX)));
    report("rmsnorm_forward", bench_ms(20, [&] { rmsnorm_forward(d_out, d_rstd, d_inp, d_w, N, C, 1e-6f); }), 2.0 * NC * sizeof(floatX), 0);
    rmsnorm_forward(d_out, d_rstd, d_inp, d_w, N, C, 1e-6f);
    report("rmsnorm_backward (dinp + column sums)", bench_ms(20, [&] { rmsnorm_backward(d_out, d_dw, d_inp, d_inp, d_w, d_rstd, N, C, d_scratch); }),
           5.0 * NC * sizeof(floatX), 0);
    void* d[] = {d_inp, d_out, d_w, d_rstd, d_dw, d_scratch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("rmsnorm");
    check_size(1024, 768, 1e-6f);  // transformers' default epsilon
    check_size(333, 128, 1e-5f);   // rows that do not fill the last block
    benchmark(4 * 2048, 2048);
    return finish();
}
