/*
The fused classifier (softmax over the V real tokens of the padded logits, cross-entropy,
and its gradient written in place over the logits) against the CPU trainer's
classifier_forward / classifier_backward; then a benchmark at GPT-2
124M's shape (B 16, T 1024, Vp 50304).

    make dev/cuda/classifier && ./dev/cuda/classifier
*/
#include "common.h"

static void check_size(int N, int V, int Vp) {
    printf("N %d, V %d, Vp %d\n", N, V, Vp);
    size_t n = (size_t)N * Vp;
    float* logits = random_values(n, -4, 4, 1);
    int* targets = random_tokens(N, V, 2);
    float dloss = 1.0f / N;
    floatX* d_logits = device_floatX(logits, n);
    int* d_targets = device_copy(targets, N);
    float *d_losses, *d_lse;
    cudaCheck(cudaMalloc(&d_losses, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_lse, N * sizeof(float)));
    classifier_forward(d_losses, d_lse, d_logits, d_targets, N, V, Vp);
    classifier_backward(d_logits, d_lse, d_targets, dloss, N, V, Vp);
    float *probs = (float*)mallocCheck(n * sizeof(float)), *losses = (float*)mallocCheck(N * sizeof(float));
    cpu::classifier_forward(losses, probs, logits, targets, N, V, Vp);
    cpu::classifier_backward(probs, targets, dloss, N, Vp);
    float *g_losses = host_float(d_losses, N), *g_dlogits = host_float(d_logits, n);
    // losses: fp32 sums over V terms; dlogits: one rounding, an fp32 exp of the logit minus the log-sum-exp
    check("forward: losses", g_losses, losses, N, tolerance(0, 0, V));
    check("backward: dlogits (in place, padding 0)", g_dlogits, probs, n, tolerance(1, 0, V));
    free(logits); free(targets); free(probs); free(losses); free(g_losses); free(g_dlogits);
    void* d[] = {d_logits, d_targets, d_losses, d_lse};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("classifier");
    check_size(64, 50257, 50304);
    check_size(33, 1000, 1024);
    int N = 16 * 1024, V = 50257, Vp = 50304;
    printf("benchmark: N %d, V %d, Vp %d\n", N, V, Vp);
    floatX* d_logits;
    int* targets = random_tokens(N, V, 3);
    int* d_targets = device_copy(targets, N);
    float *d_losses, *d_lse;
    cudaCheck(cudaMalloc(&d_logits, (size_t)N * Vp * sizeof(floatX)));
    cudaCheck(cudaMemset(d_logits, 0, (size_t)N * Vp * sizeof(floatX)));
    cudaCheck(cudaMalloc(&d_losses, N * sizeof(float)));
    cudaCheck(cudaMalloc(&d_lse, N * sizeof(float)));
    double bytes = (double)N * Vp * sizeof(floatX);
    report("classifier_forward", bench_ms(10, [&] { classifier_forward(d_losses, d_lse, d_logits, d_targets, N, V, Vp); }), bytes, 0);
    report("classifier_backward", bench_ms(10, [&] { classifier_backward(d_logits, d_lse, d_targets, 0.0f, N, V, Vp); }), 2 * bytes, 0);
    free(targets);
    void* d[] = {d_logits, d_targets, d_losses, d_lse};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
    return finish();
}
