/*
SwiGLU (LLaMA's MLP activation, silu(gate) * up) forward and backward against the CPU
trainer's swiglu_forward / swiglu_backward, then a benchmark at DeepSeek-Coder 1.3B's shape
(B 4, T 2048, intermediate 5504).

    make dev/cuda/swiglu_bf16 && ./dev/cuda/swiglu_bf16
*/
#include "common.h"

static void check_size(int N, int F) {
    printf("N %d, F %d\n", N, F);
    size_t NF = (size_t)N * F;
    float *fch = random_values(2 * NF, -6, 6, 1), *dout = random_values(NF, -1, 1, 2);
    floatX *d_fch = device_floatX(fch, 2 * NF), *d_dout = device_floatX(dout, NF), *d_out, *d_dfch;
    cudaCheck(cudaMalloc(&d_out, NF * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dfch, 2 * NF * sizeof(floatX)));
    swiglu_forward(d_out, d_fch, N, F);
    swiglu_backward(d_dfch, d_fch, d_dout, N, F);
    float *out = (float*)mallocCheck(NF * sizeof(float)), *dfch = (float*)callocCheck(2 * NF, sizeof(float));
    cpu::swiglu_forward(out, fch, N, F);
    cpu::swiglu_backward(dfch, fch, dout, N, F);
    float *g_out = host_float(d_out, NF), *g_dfch = host_float(d_dfch, 2 * NF);
    // a few fp32 operations per element (expf is within 2 ulp): 8 ulps of fp32, one rounding to floatX
    check("forward: out", g_out, out, NF, tolerance(1, 0, 8));
    check_strided("backward: dgate", g_dfch, dfch, N, F, 2 * F, 2 * F, tolerance(1, 0, 8));
    check_strided("backward: dup", g_dfch + F, dfch + F, N, F, 2 * F, 2 * F, tolerance(1, 0, 8));
    free(fch); free(dout); free(out); free(dfch); free(g_out); free(g_dfch);
    void* d[] = {d_fch, d_dout, d_out, d_dfch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("swiglu");
    check_size(512, 1024);
    check_size(77, 172); // an intermediate size that is no multiple of a pack (the LLaMA reference's)
    int N = 4 * 2048, F = 5504;
    size_t NF = (size_t)N * F;
    printf("benchmark: N %d, F %d\n", N, F);
    floatX *fch, *out, *dfch;
    cudaCheck(cudaMalloc(&fch, 2 * NF * sizeof(floatX)));
    cudaCheck(cudaMalloc(&out, NF * sizeof(floatX)));
    cudaCheck(cudaMalloc(&dfch, 2 * NF * sizeof(floatX)));
    cudaCheck(cudaMemset(fch, 0, 2 * NF * sizeof(floatX)));
    report("swiglu_forward", bench_ms(20, [&] { swiglu_forward(out, fch, N, F); }), 3.0 * NF * sizeof(floatX), 0);
    report("swiglu_backward", bench_ms(20, [&] { swiglu_backward(dfch, fch, out, N, F); }), 5.0 * NF * sizeof(floatX), 0);
    void* d[] = {fch, out, dfch};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
    return finish();
}
