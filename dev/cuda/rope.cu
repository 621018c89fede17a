/*
Rotary position embeddings on the q and k heads of qkv, forward and backward (the inverse
rotation, on dqkv), against the CPU trainer's rope_rotate with the tables both take from
dstrain.h's rope_tables; grouped-query layouts (fewer k heads than q heads) included. Then a
benchmark at DeepSeek-Coder 1.3B's shape (B 4, T 2048, 16 heads of 128).

    make dev/cuda/rope_bf16 && ./dev/cuda/rope_bf16
*/
#include "common.h"

static void check_size(int B, int T, int NH, int NKV, int hs, float theta) {
    printf("B %d, T %d, NH %d, NKV %d, hs %d, theta %g\n", B, T, NH, NKV, hs, theta);
    AttHeads hd = {NH, NKV, hs};
    size_t n = (size_t)B * T * hd.row(), half_n = (size_t)T * (hs / 2);
    float *tables = (float*)mallocCheck(2 * half_n * sizeof(float));
    rope_tables(tables, tables + half_n, T, hs, theta);
    float* d_tables = device_copy(tables, 2 * half_n);
    cpu::HeadLayout hl = cpu::head_layout(NH * hs, NH, NKV);
    for (int direction = 1; direction >= -1; direction -= 2) {
        float* qkv = random_values(n, -2, 2, 1 + direction);
        floatX* d_qkv = device_floatX(qkv, n);
        rope_rotate(d_qkv, d_tables, d_tables + half_n, B, T, hd, (float)direction);
        cpu::rope_rotate(qkv, tables, tables + half_n, B, T, hl, (float)direction);
        float* g_qkv = host_float(d_qkv, n);
        // two fp32 products and a sum per value, one rounding to floatX; v passes untouched
        check(direction > 0 ? "forward: q and k rotated, v unchanged" : "backward: dq and dk rotated back", g_qkv, qkv, n, tolerance(1, 0, 2));
        free(qkv); free(g_qkv);
        cudaCheck(cudaFree(d_qkv));
    }
    free(tables);
    cudaCheck(cudaFree(d_tables));
}

int main(void) {
    print_header("rope");
    check_size(2, 100, 8, 2, 16, 500000.0f); // groups of 4, positions past 64
    check_size(1, 70, 4, 4, 128, 10000.0f);  // DeepSeek's head size and theta
    int B = 4, T = 2048, NH = 16, hs = 128;
    AttHeads hd = {NH, NH, hs};
    size_t n = (size_t)B * T * hd.row(), half_n = (size_t)T * (hs / 2);
    printf("benchmark: B %d, T %d, NH %d, hs %d\n", B, T, NH, hs);
    floatX* qkv;
    float* tables;
    cudaCheck(cudaMalloc(&qkv, n * sizeof(floatX)));
    cudaCheck(cudaMalloc(&tables, 2 * half_n * sizeof(float)));
    cudaCheck(cudaMemset(qkv, 0, n * sizeof(floatX)));
    cudaCheck(cudaMemset(tables, 0, 2 * half_n * sizeof(float)));
    double moved = 2.0 * B * T * 2 * NH * hs * sizeof(floatX); // q and k read and written
    report("rope_rotate (q and k)", bench_ms(20, [&] { rope_rotate(qkv, tables, tables + half_n, B, T, hd, 1.0f); }), moved, 0);
    cudaCheck(cudaFree(qkv));
    cudaCheck(cudaFree(tables));
    return finish();
}
