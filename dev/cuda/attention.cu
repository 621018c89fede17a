/*
Causal self-attention, the flash-attention-style kernels (forward; backward: prep, dK/dV,
dQ) against the CPU trainer's attention_forward / attention_backward (which store the
whole (T,T) softmax), at several head sizes, at sequence lengths that are not a multiple of
the 64-row tile, and with grouped-query attention (key/value heads shared by groups of query
heads); then benchmarks at GPT-2 124M's and DeepSeek-Coder 1.3B's shapes.

    make dev/cuda/attention && ./dev/cuda/attention
*/
#include "common.h"

// NKV key/value heads, each shared by NH / NKV query heads (NKV = NH: GPT-2's attention)
static void check_size(int B, int NH, int NKV, int T, int hs) {
    int C = NH * hs, group = NH / NKV;
    AttHeads hd = {NH, NKV, hs};
    if (ATT_DKDV_LAYOUT(hs).bytes > (int)device_prop.sharedMemPerBlockOptin) {
        printf("B %d, NH %d, NKV %d, T %d, hs %d: skipped (needs more shared memory than this device has in %s)\n", B, NH, NKV, T, hs, PRECISION_NAME);
        return;
    }
    printf("B %d, NH %d, NKV %d, T %d, hs %d\n", B, NH, NKV, T, hs);
    attention_setup(hs);
    size_t BT = (size_t)B * T, QKV = hd.row(), n_qkv = BT * QKV, n_out = BT * C;
    float *qkv = random_values(n_qkv, -2, 2, 1), *dout = random_values(n_out, -1, 1, 2);
    floatX *d_qkv = device_floatX(qkv, n_qkv), *d_dout = device_floatX(dout, n_out), *d_out, *d_dqkv;
    float *d_lse, *d_D;
    cudaCheck(cudaMalloc(&d_out, n_out * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dqkv, n_qkv * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_lse, (size_t)B * NH * T * sizeof(float)));
    cudaCheck(cudaMalloc(&d_D, (size_t)B * NH * T * sizeof(float)));
    attention_forward(d_out, d_lse, d_qkv, B, T, hd);
    attention_backward(d_dqkv, d_D, d_dout, d_qkv, d_out, d_lse, B, T, hd);
    float *out = (float*)mallocCheck(n_out * sizeof(float)), *att = (float*)mallocCheck((size_t)B * NH * T * T * sizeof(float));
    float *dqkv = (float*)callocCheck(n_qkv, sizeof(float)), *datt = (float*)mallocCheck((size_t)B * NH * T * T * sizeof(float));
    cpu::attention_forward(out, att, qkv, B, T, cpu::head_layout(C, NH, NKV));
    cpu::attention_backward(dqkv, datt, dout, qkv, att, B, T, cpu::head_layout(C, NH, NKV));
    float *g_out = host_float(d_out, n_out), *g_dqkv = host_float(d_dqkv, n_qkv);
    // forward: P and the output rounded to floatX, sums of up to T rounded P v terms, fp32 sums of hs and T terms
    check("forward: out", g_out, out, n_out, tolerance(2, T, hs + T));
    // backward: P, dS and the result rounded; sums of up to T rounded terms (dk, dv: T for each
    // head of the group); fp32 sums of hs and T terms (dk, dv: group T)
    check_strided("backward: dq", g_dqkv + hd.q(0), dqkv + hd.q(0), BT, C, QKV, QKV, tolerance(3, T, hs + T));
    check_strided("backward: dk", g_dqkv + hd.k(0), dqkv + hd.k(0), BT, NKV * hs, QKV, QKV, tolerance(3, group * T, hs + group * T));
    check_strided("backward: dv", g_dqkv + hd.v(0), dqkv + hd.v(0), BT, NKV * hs, QKV, QKV, tolerance(3, group * T, hs + group * T));
    free(qkv); free(dout); free(out); free(att); free(dqkv); free(datt); free(g_out); free(g_dqkv);
    void* d[] = {d_qkv, d_dout, d_out, d_dqkv, d_lse, d_D};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

static void benchmark(int B, int NH, int NKV, int T, int hs) {
    int C = NH * hs;
    AttHeads hd = {NH, NKV, hs};
    printf("benchmark: B %d, NH %d, NKV %d, T %d, hs %d\n", B, NH, NKV, T, hs);
    attention_setup(hs);
    size_t BT = (size_t)B * T;
    floatX *d_qkv, *d_out, *d_dqkv;
    float *d_lse, *d_D;
    cudaCheck(cudaMalloc(&d_qkv, BT * hd.row() * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dqkv, BT * hd.row() * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_out, BT * C * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_lse, (size_t)B * NH * T * sizeof(float)));
    cudaCheck(cudaMalloc(&d_D, (size_t)B * NH * T * sizeof(float)));
    cudaCheck(cudaMemset(d_qkv, 0, BT * hd.row() * sizeof(floatX)));
    // model FLOPs: forward Q K^T and P V over the causal half; backward five such products
    double fwd_flops = 2.0 * 2.0 * B * NH * (double)T * T * hs / 2;
    report("attention_forward", bench_ms(10, [&] { attention_forward(d_out, d_lse, d_qkv, B, T, hd); }), 0, fwd_flops);
    report("attention_backward", bench_ms(10, [&] { attention_backward(d_dqkv, d_D, d_out, d_qkv, d_out, d_lse, B, T, hd); }), 0, 2.5 * fwd_flops);
    void* d[] = {d_qkv, d_out, d_dqkv, d_lse, d_D};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("attention");
    check_size(2, 12, 12, 256, 64); // GPT-2's head size
    check_size(2, 4, 4, 200, 32);   // the last tile partly beyond T
    check_size(1, 4, 4, 100, 16);   // the smallest head size
    check_size(1, 2, 2, 70, 128);   // the largest (DeepSeek's)
    check_size(1, 3, 3, 1, 64);     // one token (sampling starts there)
    check_size(1, 8, 2, 100, 128);  // grouped-query attention: groups of 4 at DeepSeek's head size
    check_size(2, 6, 3, 70, 32);    // groups of 2
    benchmark(16, 12, 12, 1024, 64); // GPT-2 124M
    benchmark(4, 16, 16, 2048, 128); // DeepSeek-Coder 1.3B
    return finish();
}
