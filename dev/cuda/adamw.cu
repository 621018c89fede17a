/*
The fused AdamW step (DeepSpeed's semantics: gradient times grad_factor first; decoupled
weight decay, or L2 in the gradient with adam_w_mode false; fp32 master and moments)
against the CPU trainer's host_adamw, and the floatX working weights made from the master
(ModelOps.set_weights) after it; then a benchmark of both over GPT-2 124M's parameters.

    make dev/cuda/adamw && ./dev/cuda/adamw
*/
#include "common.h"

static void check_mode(size_t n, int adam_w_mode) {
    printf("n %zu, adam_w_mode %s\n", n, adam_w_mode ? "true" : "false");
    float *p = random_values(n, -1, 1, 1), *g = random_values(n, -4, 4, 2), *m = random_values(n, -0.1f, 0.1f, 3), *v = random_values(n, 0, 0.01f, 4);
    float *d_p = device_copy(p, n), *d_g = device_copy(g, n), *d_m = device_copy(m, n), *d_v = device_copy(v, n);
    floatX* d_lowp;
    cudaCheck(cudaMalloc(&d_lowp, n * sizeof(floatX)));
    DSConfig c;
    ds_config_defaults(&c);
    c.betas[1] = 0.95; c.weight_decay = 0.1; c.adam_w_mode = adam_w_mode;
    StepPlan plan;
    memset(&plan, 0, sizeof plan);
    plan.grad_factor = 0.25f; plan.lr = 1e-3f; plan.adam_t = 3;
    adamw_update(d_p, d_m, d_v, d_g, n, &plan, &c);
    weights_from_master(d_lowp, d_p, n);
    cpu::host_adamw(p, m, v, g, n, &plan, &c);
    float *g_p = host_float(d_p, n), *g_m = host_float(d_m, n), *g_v = host_float(d_v, n), *g_lowp = host_float(d_lowp, n);
    // elementwise fp32 arithmetic, a dozen operations: 16 ulps of fp32; the copy adds one rounding
    check("master weights", g_p, p, n, tolerance(0, 0, 16));
    check("first moment", g_m, m, n, tolerance(0, 0, 16));
    check("second moment", g_v, v, n, tolerance(0, 0, 16));
    check("floatX weights from the master", g_lowp, p, n, tolerance(1, 0, 16));
    free(p); free(g); free(m); free(v); free(g_p); free(g_m); free(g_v); free(g_lowp);
    void* d[] = {d_p, d_g, d_m, d_v, d_lowp};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
}

int main(void) {
    print_header("adamw");
    check_mode((1 << 20) + 3, 1);
    check_mode((1 << 20) + 3, 0);
    size_t n = 124475904; // GPT-2 124M with the padded vocabulary
    printf("benchmark: n %zu\n", n);
    float *p, *g, *m, *v;
    floatX* lowp;
    float** bufs[4] = {&p, &g, &m, &v};
    for (int i = 0; i < 4; i++) {
        cudaCheck(cudaMalloc(bufs[i], n * sizeof(float)));
        cudaCheck(cudaMemset(*bufs[i], 0, n * sizeof(float)));
    }
    cudaCheck(cudaMalloc(&lowp, n * sizeof(floatX)));
    DSConfig c;
    ds_config_defaults(&c);
    StepPlan plan;
    memset(&plan, 0, sizeof plan);
    plan.grad_factor = 1.0f; plan.lr = 1e-4f; plan.adam_t = 1;
    report("adamw_update", bench_ms(10, [&] { adamw_update(p, m, v, g, n, &plan, &c); }), n * 7.0 * sizeof(float), 0);
    report("weights_from_master", bench_ms(10, [&] { weights_from_master(lowp, p, n); }), n * (sizeof(float) + sizeof(floatX)), 0);
    void* d[] = {p, g, m, v, lowp};
    for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++) cudaCheck(cudaFree(d[i]));
    return finish();
}
