/*
LayerNorm forward and backward against the CPU trainer's layernorm_forward /
layernorm_backward, then a benchmark at GPT-2 124M's shapes.

    make dev/cuda/layernorm && ./dev/cuda/layernorm
*/
#include "common.h"

static void check_size(int N, int C) {
    printf("N %d, C %d\n", N, C);
    size_t NC = (size_t)N * C;
    float *inp = random_values(NC, -2, 2, 1), *w = random_values(C, 0.5f, 1.5f, 2), *b = random_values(C, -0.5f, 0.5f, 3);
    float *dout = random_values(NC, -1, 1, 4), *dinp = random_values(NC, -1, 1, 5); // backward adds into dinp
    floatX *d_inp = device_floatX(inp, NC), *d_w = device_floatX(w, C), *d_b = device_floatX(b, C), *d_dout = device_floatX(dout, NC), *d_dinp = device_floatX(dinp, NC), *d_out;
    float *d_mean, *d_rstd, *d_dw, *d_db, *d_scratch;
    cudaCheck(cudaMalloc(&d_out, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_mean, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_rstd, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_scratch, column_sums_scratch_floats(N, C) * sizeof(float)));
    float *out = (float*)mallocCheck(NC * sizeof(float)), *mean = (float*)mallocCheck(N * sizeof(float)), *rstd = (float*)mallocCheck(N * sizeof(float));
    layernorm_forward(d_out, d_mean, d_rstd, d_inp, d_w, d_b, N, C, 1e-5f);
    cpu::layernorm_forward(out, mean, rstd, inp, w, b, N, C, 1e-5f); // GPT-2's epsilon
    float *g_out = host_float(d_out, NC), *g_mean = host_float(d_mean, N), *g_rstd = host_float(d_rstd, N);
    check("forward: out", g_out, out, NC, tolerance(1, 0, C));
    check("forward: mean", g_mean, mean, N, tolerance(0, 0, C));
    check("forward: rstd", g_rstd, rstd, N, tolerance(0, 0, C));

    float *dw = (float*)callocCheck(C, sizeof(float)), *db = (float*)callocCheck(C, sizeof(float));
    d_dw = device_copy(dw, C);
    d_db = device_copy(db, C);
    layernorm_backward(d_dinp, d_dw, d_db, d_dout, d_inp, d_w, d_mean, d_rstd, N, C, d_scratch);
    cpu::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    float *g_dinp = host_float(d_dinp, NC), *g_dw = host_float(d_dw, C), *g_db = host_float(d_db, C);
    check("backward: dinp (accumulated)", g_dinp, dinp, NC, tolerance(1, 0, C));
    check("backward: dweight", g_dw, dw, C, tolerance(0, 0, N));
    check("backward: dbias", g_db, db, C, tolerance(0, 0, N));
    free(inp); free(w); free(b); free(dout); free(dinp); free(out); free(mean); free(rstd); free(dw); free(db);
    free(g_out); free(g_mean); free(g_rstd); free(g_dinp); free(g_dw); free(g_db);
    void* d[] = {d_inp, d_w, d_b, d_dout, d_dinp, d_out, d_mean, d_rstd, d_dw, d_db, d_scratch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

static void benchmark(int N, int C) {
    printf("benchmark: N %d, C %d\n", N, C);
    size_t NC = (size_t)N * C;
    floatX *d_inp, *d_out, *d_w, *d_b;
    float *d_mean, *d_rstd, *d_dw, *d_db, *d_scratch;
    cudaCheck(cudaMalloc(&d_inp, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_out, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_w, C * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_b, C * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_mean, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_rstd, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_dw, C * sizeof(float)));
    cudaCheck(cudaMalloc(&d_db, C * sizeof(float)));
    cudaCheck(cudaMalloc(&d_scratch, column_sums_scratch_floats(N, C) * sizeof(float)));
    cudaCheck(cudaMemset(d_inp, 0, NC * sizeof(floatX)));
    cudaCheck(cudaMemset(d_w, 0, C * sizeof(floatX)));
    cudaCheck(cudaMemset(d_b, 0, C * sizeof(floatX)));
    double ms = bench_ms(20, [&] { layernorm_forward(d_out, d_mean, d_rstd, d_inp, d_w, d_b, N, C, 1e-5f); });
    report("layernorm_forward", ms, 2.0 * NC * sizeof(floatX), 0);
    layernorm_forward(d_out, d_mean, d_rstd, d_inp, d_w, d_b, N, C, 1e-5f);
    ms = bench_ms(20, [&] { layernorm_backward(d_out, d_dw, d_db, d_inp, d_inp, d_w, d_mean, d_rstd, N, C, d_scratch); });
    report("layernorm_backward (dinp + column sums)", ms, 6.0 * NC * sizeof(floatX), 0);
    void* d[] = {d_inp, d_out, d_w, d_b, d_mean, d_rstd, d_dw, d_db, d_scratch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("layernorm");
    check_size(1024, 768);
    check_size(333, 64);
    benchmark(16 * 1024, 768);
    return finish();
}
