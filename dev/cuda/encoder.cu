/*
Encoder (token + position embedding) forward and backward against the CPU trainer's
encoder_forward / encoder_backward, then a benchmark at GPT-2 124M's shapes.

    make dev/cuda/encoder && ./dev/cuda/encoder
*/
#include "common.h"

static void check_size(int B, int T, int C, int V) {
    printf("B %d, T %d, C %d, V %d\n", B, T, C, V);
    size_t BT = (size_t)B * T;
    float *wte = random_values((size_t)V * C, -1, 1, 1), *wpe = random_values((size_t)T * C, -1, 1, 2);
    float* dout = random_values(BT * C, -1, 1, 3);
    int* tokens = random_tokens(BT, V, 4);
    floatX *d_wte = device_floatX(wte, (size_t)V * C), *d_wpe = device_floatX(wpe, (size_t)T * C), *d_dout = device_floatX(dout, BT * C), *d_out;
    int* d_tokens = device_copy(tokens, BT);
    cudaCheck(cudaMalloc(&d_out, BT * C * sizeof(floatX)));
    encoder_forward(d_out, d_tokens, d_wte, d_wpe, B, T, C);
    float* out = (float*)mallocCheck(BT * C * sizeof(float));
    cpu::encoder_forward(out, tokens, wte, wpe, B, T, C);
    float* gpu_out = host_float(d_out, BT * C);
    check("forward: out", gpu_out, out, BT * C, tolerance(1, 0, 2));

    // backward into zero gradients: a token's rows are summed in fp32, up to B*T of them
    float *dwte = (float*)callocCheck((size_t)V * C, sizeof(float)), *dwpe = (float*)callocCheck((size_t)T * C, sizeof(float));
    float *d_dwte = device_copy(dwte, (size_t)V * C), *d_dwpe = device_copy(dwpe, (size_t)T * C);
    TokenBuckets tb;
    token_buckets_init(&tb, V, (int)BT);
    int nb = token_buckets_upload(&tb, tokens, (int)BT, V); // done by the trainer's forward
    encoder_backward(d_dwte, d_dwpe, d_dout, B, T, C, &tb, nb);
    cpu::encoder_backward(dwte, dwpe, dout, tokens, B, T, C);
    float *gpu_dwte = host_float(d_dwte, (size_t)V * C), *gpu_dwpe = host_float(d_dwpe, (size_t)T * C);
    check("backward: dwte", gpu_dwte, dwte, (size_t)V * C, tolerance(0, 0, BT));
    check("backward: dwpe", gpu_dwpe, dwpe, (size_t)T * C, tolerance(0, 0, B));
    token_buckets_free(&tb);
    free(wte); free(wpe); free(dout); free(tokens); free(out); free(gpu_out); free(dwte); free(dwpe); free(gpu_dwte); free(gpu_dwpe);
    void* d[] = {d_wte, d_wpe, d_dout, d_out, d_tokens, d_dwte, d_dwpe};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

static void benchmark(int B, int T, int C, int V) {
    printf("benchmark: B %d, T %d, C %d, V %d\n", B, T, C, V);
    size_t BT = (size_t)B * T;
    int* tokens = random_tokens(BT, V, 5);
    int* d_tokens = device_copy(tokens, BT);
    floatX *d_wte, *d_wpe, *d_out;
    float *d_dwte, *d_dwpe;
    cudaCheck(cudaMalloc(&d_wte, (size_t)V * C * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_wpe, (size_t)T * C * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_out, BT * C * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_dwte, (size_t)V * C * sizeof(float)));
    cudaCheck(cudaMalloc(&d_dwpe, (size_t)T * C * sizeof(float)));
    cudaCheck(cudaMemset(d_wte, 0, (size_t)V * C * sizeof(floatX)));
    cudaCheck(cudaMemset(d_wpe, 0, (size_t)T * C * sizeof(floatX)));
    TokenBuckets tb;
    token_buckets_init(&tb, V, (int)BT);
    double ms = bench_ms(20, [&] { encoder_forward(d_out, d_tokens, d_wte, d_wpe, B, T, C); });
    report("encoder_forward", ms, 3.0 * BT * C * sizeof(floatX), 0);
    ms = bench_ms(20, [&] { token_buckets_upload(&tb, tokens, (int)BT, V); });
    report("token_buckets_upload (host sort, in forward)", ms, 0, 0);
    int nb = token_buckets_upload(&tb, tokens, (int)BT, V);
    ms = bench_ms(20, [&] { encoder_backward(d_dwte, d_dwpe, d_out, B, T, C, &tb, nb); });
    report("encoder_backward", ms, BT * C * (sizeof(floatX) + 2.0 * sizeof(float)), 0);
    token_buckets_free(&tb);
    free(tokens);
    void* d[] = {d_tokens, d_wte, d_wpe, d_out, d_dwte, d_dwpe};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("encoder");
    check_size(4, 256, 768, 50257);
    check_size(3, 100, 64, 37); // a small vocabulary: every token repeats many times
    benchmark(16, 1024, 768, 50257);
    return finish();
}
