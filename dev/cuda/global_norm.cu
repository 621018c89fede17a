/*
The gradient statistics the step logic needs, in one read of the gradients: the sum of
squares (for the global norm) and the count of inf/nan (the fp16 overflow check), with a
fixed grid and fixed-order reductions. Checked against the CPU trainer's host_stats (both
sum the exact fp64 squares in fp64, in different orders: each within n 2^-53 of the exact
sum, so they agree within 2 n 2^-53), for determinism (the same bits twice), and for an
inf and a nan at the ends of the buffer; then a benchmark over GPT-2 124M's parameters.

    make dev/cuda/global_norm && ./dev/cuda/global_norm
*/
#include "common.h"

static void check_result(const char* what, int ok) {
    printf("  %-4s %s\n", ok ? "ok" : "FAIL", what);
    checks_failed += !ok;
}

static GradStats s; // the buffers, for the life of the process (as in the trainer)

static void check_size(size_t n) {
    printf("n %zu\n", n);
    float* g = random_values(n, -1, 1, 1);
    float* d_g = device_copy(g, n);
    int bad, bad2, cpu_bad;
    double ss, ss2, cpu_ss;
    grad_stats(&s, d_g, n, &bad, &ss);
    grad_stats(&s, d_g, n, &bad2, &ss2);
    cpu::host_stats(g, n, &cpu_bad, &cpu_ss);
    printf("  sum of squares %.17g, CPU %.17g\n", ss, cpu_ss);
    check_result("sum of squares agrees with the CPU within 2 n 2^-53, no inf/nan", fabs(ss - cpu_ss) <= 2.0 * n * ldexp(1.0, -53) * cpu_ss && bad == 0 && cpu_bad == 0);
    check_result("two runs give the same bits", memcmp(&ss, &ss2, sizeof ss) == 0 && bad2 == 0);
    float inf = INFINITY, nan = NAN, zero = 0.0f;
    cudaCheck(cudaMemcpy(d_g + n - 1, &inf, sizeof(float), cudaMemcpyHostToDevice));
    grad_stats(&s, d_g, n, &bad, &ss);
    check_result("an inf in the last element is seen", bad == 1);
    cudaCheck(cudaMemcpy(d_g + n - 1, &zero, sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_g, &nan, sizeof(float), cudaMemcpyHostToDevice));
    grad_stats(&s, d_g, n, &bad, &ss);
    check_result("a nan in the first element is seen", bad == 1);
    free(g);
    cudaCheck(cudaFree(d_g));
}

int main(void) {
    print_header("global_norm");
    grad_stats_init(&s);
    check_size(10000019);
    check_size(1000);
    size_t n = 124475904;
    printf("benchmark: n %zu\n", n);
    float* g;
    cudaCheck(cudaMalloc(&g, n * sizeof(float)));
    cudaCheck(cudaMemset(g, 0, n * sizeof(float)));
    int bad;
    double ss;
    report("grad_stats (norm and inf/nan, with the copy to the host)", bench_ms(10, [&] { grad_stats(&s, g, n, &bad, &ss); }), n * sizeof(float), 0);
    cudaCheck(cudaFree(g));
    return finish();
}
