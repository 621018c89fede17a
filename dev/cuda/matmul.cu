/*
The cuBLASLt matrix products (forward with bias and residual epilogue, input and weight
gradients, and the bias gradient's column sums) against the CPU trainer's matmul_forward,
matmul_backward_input, matmul_backward_weight and bias_backward, then a benchmark of GPT-2
124M's products.

    make dev/cuda/matmul && ./dev/cuda/matmul
*/
#include "common.h"

// out (N,OC) = inp (N,C) @ weight^T + bias (+ residual); then the three gradients
static void check_size(int N, int C, int OC, int with_bias, int with_residual) {
    printf("N %d, C %d, OC %d, bias %s, residual %s\n", N, C, OC, with_bias ? "yes" : "no", with_residual ? "yes" : "no");
    size_t NC = (size_t)N * C, NO = (size_t)N * OC, OCC = (size_t)OC * C;
    float *inp = random_values(NC, -1, 1, 1), *w = random_values(OCC, -0.1f, 0.1f, 2), *bias = random_values(OC, -1, 1, 3);
    float *residual = random_values(NO, -1, 1, 4), *dout = random_values(NO, -1, 1, 5);
    float *dw = random_values(OCC, -1, 1, 6), *db = random_values(OC, -1, 1, 7); // weight gradients accumulate
    floatX *d_inp = device_floatX(inp, NC), *d_w = device_floatX(w, OCC), *d_bias = device_floatX(bias, OC), *d_res = device_floatX(residual, NO);
    floatX *d_dout = device_floatX(dout, NO), *d_out, *d_dinp;
    float *d_dw = device_copy(dw, OCC), *d_db = device_copy(db, OC), *d_scratch;
    cudaCheck(cudaMalloc(&d_out, NO * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dinp, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_scratch, column_sums_scratch_floats(N, OC) * sizeof(float)));
    matmul_forward(d_out, d_inp, d_w, with_bias ? d_bias : NULL, with_residual ? d_res : NULL, N, C, OC);
    float* out = (float*)mallocCheck(NO * sizeof(float));
    cpu::matmul_forward(out, inp, w, with_bias ? bias : NULL, N, C, OC);
    if (with_residual) for (size_t i = 0; i < NO; i++) out[i] += residual[i];
    float* g_out = host_float(d_out, NO);
    check("forward: out", g_out, out, NO, tolerance(1, 0, C + 2));

    matmul_backward_input(d_dinp, d_dout, d_w, N, C, OC);
    matmul_backward_weight(d_dw, d_dout, d_inp, N, C, OC);
    if (with_bias) bias_backward(d_db, d_dout, N, OC, d_scratch);
    float* dinp = (float*)callocCheck(NC, sizeof(float)); // the CPU accumulates: from 0, as the GPU writes
    cpu::matmul_backward_input(dinp, dout, w, N, C, OC);
    cpu::matmul_backward_weight(dw, dout, inp, N, C, OC);
    if (with_bias) cpu::bias_backward(db, dout, N, OC);
    float *g_dinp = host_float(d_dinp, NC), *g_dw = host_float(d_dw, OCC), *g_db = host_float(d_db, OC);
    check("backward: dinp", g_dinp, dinp, NC, tolerance(1, 0, OC));
    check("backward: dweight (accumulated, fp32)", g_dw, dw, OCC, tolerance(0, 0, N + 1));
    if (with_bias) check("backward: dbias (accumulated, fp32)", g_db, db, OC, tolerance(0, 0, N + 1));
    free(inp); free(w); free(bias); free(residual); free(dout); free(dw); free(db); free(out); free(g_out); free(dinp); free(g_dinp); free(g_dw); free(g_db);
    void* d[] = {d_inp, d_w, d_bias, d_res, d_dout, d_out, d_dinp, d_dw, d_db, d_scratch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

static void benchmark(const char* name, int N, int C, int OC, int with_bias, int with_residual) {
    size_t NC = (size_t)N * C, NO = (size_t)N * OC, OCC = (size_t)OC * C;
    floatX *d_inp, *d_w, *d_bias, *d_out, *d_dinp;
    float *d_dw, *d_db, *d_scratch;
    cudaCheck(cudaMalloc(&d_inp, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_w, OCC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_bias, OC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_out, NO * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dinp, NC * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dw, OCC * sizeof(float)));
    cudaCheck(cudaMalloc(&d_db, OC * sizeof(float)));
    cudaCheck(cudaMalloc(&d_scratch, column_sums_scratch_floats(N, OC) * sizeof(float)));
    cudaCheck(cudaMemset(d_inp, 0, NC * sizeof(floatX)));
    cudaCheck(cudaMemset(d_w, 0, OCC * sizeof(floatX)));
    cudaCheck(cudaMemset(d_bias, 0, OC * sizeof(floatX)));
    cudaCheck(cudaMemset(d_out, 0, NO * sizeof(floatX)));
    double flops = 2.0 * N * C * OC;
    char what[128];
    snprintf(what, sizeof what, "%s forward (%d x %d x %d)", name, N, C, OC);
    report(what, bench_ms(10, [&] { matmul_forward(d_out, d_inp, d_w, with_bias ? d_bias : NULL, with_residual ? d_out : NULL, N, C, OC); }), 0, flops);
    snprintf(what, sizeof what, "%s backward input", name);
    report(what, bench_ms(10, [&] { matmul_backward_input(d_dinp, d_out, d_w, N, C, OC); }), 0, flops);
    snprintf(what, sizeof what, "%s backward weight", name);
    report(what, bench_ms(10, [&] { matmul_backward_weight(d_dw, d_out, d_inp, N, C, OC); }), 0, flops);
    if (with_bias) {
        snprintf(what, sizeof what, "%s backward bias", name);
        report(what, bench_ms(10, [&] { bias_backward(d_db, d_out, N, OC, d_scratch); }), (double)NO * sizeof(floatX), 0);
    }
    void* d[] = {d_inp, d_w, d_bias, d_out, d_dinp, d_dw, d_db, d_scratch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("matmul (cuBLASLt)");
    check_size(512, 768, 3072, 1, 0);  // fc
    check_size(512, 3072, 768, 1, 1);  // fcproj, adding the residual
    check_size(300, 64, 192, 1, 0);    // qkv of a small model, rows not a multiple of 128
    check_size(128, 64, 50304, 0, 0);  // the tied classifier: no bias
    int N = 16 * 1024; // GPT-2 124M, B 16, T 1024
    printf("benchmark: GPT-2 124M, %d rows\n", N);
    benchmark("qkv", N, 768, 3 * 768, 1, 0);
    benchmark("attproj", N, 768, 768, 1, 1);
    benchmark("fc", N, 768, 4 * 768, 1, 0);
    benchmark("fcproj", N, 4 * 768, 768, 1, 1);
    benchmark("classifier", N, 768, 50304, 0, 0);
    return finish();
}
