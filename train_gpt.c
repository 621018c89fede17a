/*
train_gpt.c: the CPU reference trainer. GPT-2 and LLaMA (DeepSeek-LLM: Hugging Face's
LlamaForCausalLM) in fp32 with OpenMP, trained the way DeepSpeed trains them
(ds_config.json, AdamW, schedules, clipping, gradient accumulation, fp16 loss scaling
semantics). Everything that is not model math (config, batch rules, schedules, loss
scaler, data loader, checkpoints, Hugging Face files, logs, command line) is in dstrain.h.

Each layer is a pair of functions, xxx_forward / xxx_backward, with the tensor shapes in
a comment; backward functions accumulate into gradients with +=.

Sections, in order; train_gpt.cu has the same ones in the same order, with the same names,
and its own GPU-only ones between them:
    encoder            token and position embeddings
    layernorm
    rmsnorm            LLaMA's norm
    matmul             the plain loops that define it, and the functions the layers call
    attention          causal self-attention, grouped-query (key/value heads shared)
    rope               rotary position embeddings
    gelu               tanh approximation
    swiglu             LLaMA's MLP activation
    residual           (CPU only: the GPU adds the residual inside its matmul)
    classifier         softmax and cross-entropy
    the model          GPT-2 and LLaMA in one layer loop: weights, activations, forward, backward
    fast matmul        (CPU only) the blocked AVX-512 GEMM behind matmul
    optimizer buffers  the arithmetic of dstrain.h's ZeRO on host memory
    the trainer        the model behind dstrain.h's ModelOps, and main

    make train_gpt_cpu && ./train_gpt_cpu --help
*/
#include "dstrain.h"

// ----------------------------------------------------------------------------
// encoder: token and position embeddings

// out (B,T,C) = wte[inp] + wpe[t]; wpe NULL (LLaMA: positions are rotary, in attention): wte[inp]
void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) {
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float* o = out + ((size_t)b * T + t) * C;
            const float* we = wte + (size_t)inp[b * T + t] * C;
            const float* pe = wpe ? wpe + (size_t)t * C : NULL;
            for (int i = 0; i < C; i++) o[i] = pe ? we[i] + pe[i] : we[i];
        }
    }
}

// dwte (Vp,C) += scatter of dout (B,T,C) by token; dwpe (maxT,C) += sum over B (wpe NULL: none)
void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) {
    // parallel over channels: rows of dwte repeat when a token repeats, channels never collide
    #pragma omp parallel for
    for (int i = 0; i < C; i++) {
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                float d = dout[((size_t)b * T + t) * C + i];
                dwte[(size_t)inp[b * T + t] * C + i] += d;
                if (dwpe) dwpe[(size_t)t * C + i] += d;
            }
        }
    }
}

// ----------------------------------------------------------------------------
// layernorm

// out (N,C) = (inp - mean) * rstd * weight + bias, per row; saves mean, rstd (N) for backward
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias, int N, int C, float eps) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        double sum = 0.0;
        for (int i = 0; i < C; i++) sum += x[i];
        float m = (float)(sum / C);
        double var = 0.0;
        for (int i = 0; i < C; i++) { float d = x[i] - m; var += d * d; }
        float s = 1.0f / sqrtf((float)(var / C) + eps);
        float* o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

// dinp (N,C) += ..., dweight (C) += ..., dbias (C) += ..., from dout (N,C)
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp, const float* weight,
                        const float* mean, const float* rstd, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        const float* d = dout + (size_t)n * C;
        float* dx = dinp + (size_t)n * C;
        float m = mean[n], s = rstd[n];
        // dnorm = d * weight; dx = s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
        double dnorm_mean = 0.0, dnorm_norm_mean = 0.0;
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s;
            float dnorm = d[i] * weight[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        float a = (float)(dnorm_mean / C), b = (float)(dnorm_norm_mean / C);
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s;
            dx[i] += s * (d[i] * weight[i] - a - norm * b);
        }
    }
    // parameter gradients: parallel over channels so each sum has one owner and a fixed order
    #pragma omp parallel for
    for (int i = 0; i < C; i++) {
        float dw = 0.0f, db = 0.0f;
        for (int n = 0; n < N; n++) {
            float norm = (inp[(size_t)n * C + i] - mean[n]) * rstd[n];
            dw += dout[(size_t)n * C + i] * norm;
            db += dout[(size_t)n * C + i];
        }
        dweight[i] += dw;
        dbias[i] += db;
    }
}

// ----------------------------------------------------------------------------
// rmsnorm (LLaMA)

// out (N,C) = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps) per row, as
// transformers' LlamaRMSNorm (the weight multiplies the normalised row); saves rstd (N)
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C, float eps) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        double sumsq = 0.0;
        for (int i = 0; i < C; i++) sumsq += x[i] * x[i];
        float s = 1.0f / sqrtf((float)(sumsq / C) + eps);
        float* o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = weight[i] * (x[i] * s);
        rstd[n] = s;
    }
}

// dinp (N,C) += ..., dweight (C) += ..., from dout (N,C)
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight, const float* rstd, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;
        const float* d = dout + (size_t)n * C;
        float* dx = dinp + (size_t)n * C;
        float s = rstd[n];
        // norm = x * s, dnorm = d * weight: dx = s * (dnorm - norm * mean(dnorm * norm))
        double dnorm_norm_mean = 0.0;
        for (int i = 0; i < C; i++) dnorm_norm_mean += d[i] * weight[i] * (x[i] * s);
        float b = (float)(dnorm_norm_mean / C);
        for (int i = 0; i < C; i++) dx[i] += s * (d[i] * weight[i] - x[i] * s * b);
    }
    // the weight's gradient: parallel over channels so each sum has one owner and a fixed order
    #pragma omp parallel for
    for (int i = 0; i < C; i++) {
        float dw = 0.0f;
        for (int n = 0; n < N; n++) dw += dout[(size_t)n * C + i] * inp[(size_t)n * C + i] * rstd[n];
        dweight[i] += dw;
    }
}

// ----------------------------------------------------------------------------
// matmul: the three products of a Linear layer, weight (OC,C) row-major as in PyTorch.
// The plain loops come first: they define the products and are the oracle that
// dev/cpu/matmul.c holds the fast GEMM to. The layers call matmul_forward,
// matmul_backward_input and matmul_backward_weight, which run the blocked GEMM of section
// "fast matmul" at the end of the model code.

// out (BT,OC) = inp (BT,C) @ weight^T + bias; bias (OC) or NULL
void matmul_forward_naive(float* out, const float* inp, const float* weight, const float* bias, int BT, int C, int OC) {
    #pragma omp parallel for
    for (int b = 0; b < BT; b++) {
        for (int o = 0; o < OC; o++) {
            float s = bias ? bias[o] : 0.0f;
            for (int i = 0; i < C; i++) s += inp[(size_t)b * C + i] * weight[(size_t)o * C + i];
            out[(size_t)b * OC + o] = s;
        }
    }
}

// dinp (BT,C) += dout (BT,OC) @ weight (OC,C)
void matmul_backward_input_naive(float* dinp, const float* dout, const float* weight, int BT, int C, int OC) {
    #pragma omp parallel for
    for (int b = 0; b < BT; b++) {
        for (int i = 0; i < C; i++) {
            float s = 0.0f;
            for (int o = 0; o < OC; o++) s += dout[(size_t)b * OC + o] * weight[(size_t)o * C + i];
            dinp[(size_t)b * C + i] += s;
        }
    }
}

// dweight (OC,C) += dout^T (OC,BT) @ inp (BT,C)
void matmul_backward_weight_naive(float* dweight, const float* dout, const float* inp, int BT, int C, int OC) {
    #pragma omp parallel for
    for (int o = 0; o < OC; o++) {
        for (int i = 0; i < C; i++) {
            float s = 0.0f;
            for (int b = 0; b < BT; b++) s += dout[(size_t)b * OC + o] * inp[(size_t)b * C + i];
            dweight[(size_t)o * C + i] += s;
        }
    }
}

// C (M,N) (+)= A (M,K) @ B (K,N) with strides: section "fast matmul"
static void gemm(int M, int N, int K, const float* A, long ars, long acs, const float* B, long brs, long bcs,
                 float* C, long ldc, int accumulate, const float* bias);

// as matmul_forward_naive
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int BT, int C, int OC) {
    gemm(BT, OC, C, inp, C, 1, weight, 1, C, out, OC, 0, bias);
}

// as matmul_backward_input_naive
void matmul_backward_input(float* dinp, const float* dout, const float* weight, int BT, int C, int OC) {
    gemm(BT, C, OC, dout, OC, 1, weight, C, 1, dinp, C, 1, NULL);
}

// as matmul_backward_weight_naive
void matmul_backward_weight(float* dweight, const float* dout, const float* inp, int BT, int C, int OC) {
    gemm(OC, C, BT, dout, 1, OC, inp, C, 1, dweight, C, 1, NULL);
}

// dbias (OC) += sum over BT of dout (BT,OC)
void bias_backward(float* dbias, const float* dout, int BT, int OC) {
    #pragma omp parallel for
    for (int o0 = 0; o0 < OC; o0 += 64) {  // 64 columns of dout at a time, summed down the rows
        int n = OC - o0 < 64 ? OC - o0 : 64;
        float sum[64] = {0};
        for (int b = 0; b < BT; b++)
            for (int o = 0; o < n; o++) sum[o] += dout[(long)b * OC + o0 + o];
        for (int o = 0; o < n; o++) dbias[o0 + o] += sum[o];
    }
}

// ----------------------------------------------------------------------------
// attention: causal self-attention, with grouped-query attention (LLaMA)

// qkv (B,T,QKV) holds [q (NH*hs) | k (NKV*hs) | v (NKV*hs)] per position, QKV = (NH + 2*NKV)*hs.
// Query head h uses key/value head h / (NH/NKV): the NH/NKV heads of a group read the same
// k and v (GPT-2: NKV = NH, one head each), without copies.
typedef struct { int NH, NKV, hs; size_t row; } HeadLayout; // row: QKV, floats per position of qkv

HeadLayout head_layout(int C, int NH, int NKV) {
    int hs = C / NH;
    HeadLayout h = {NH, NKV, hs, (size_t)(NH + 2 * NKV) * hs};
    return h;
}
size_t q_offset(const HeadLayout* h, int head) { return (size_t)head * h->hs; }
size_t k_offset(const HeadLayout* h, int head) { return (size_t)(h->NH + head / (h->NH / h->NKV)) * h->hs; }
size_t v_offset(const HeadLayout* h, int head) { return (size_t)(h->NH + h->NKV + head / (h->NH / h->NKV)) * h->hs; }

// out (B,T,NH*hs); att (B,NH,T,T) saves the softmax for backward (zero above the diagonal).
void attention_forward(float* out, float* att, const float* qkv, int B, int T, HeadLayout hl) {
    int NH = hl.NH, hs = hl.hs;
    size_t C = (size_t)NH * hs;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float* seq = qkv + (size_t)b * T * hl.row;
                const float* q = seq + t * hl.row + q_offset(&hl, h);
                float* a = att + (((size_t)b * NH + h) * T + t) * T;
                float maxval = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* k = seq + t2 * hl.row + k_offset(&hl, h);
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) s += q[i] * k[i];
                    a[t2] = s * scale;
                    if (a[t2] > maxval) maxval = a[t2];
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { a[t2] = expf(a[t2] - maxval); sum += a[t2]; }
                for (int t2 = 0; t2 <= t; t2++) a[t2] /= sum;
                for (int t2 = t + 1; t2 < T; t2++) a[t2] = 0.0f;
                float* o = out + ((size_t)b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* v = seq + t2 * hl.row + v_offset(&hl, h);
                    for (int i = 0; i < hs; i++) o[i] += a[t2] * v[i];
                }
            }
        }
    }
}

// dqkv (B,T,QKV) += ..., from dout (B,T,NH*hs); datt (B,NH,T,T) is scratch
void attention_backward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att, int B, int T, HeadLayout hl) {
    int NH = hl.NH, hs = hl.hs, group = hl.NH / hl.NKV;
    size_t C = (size_t)NH * hs;
    float scale = 1.0f / sqrtf((float)hs);
    // parallel over (b, key/value head): the heads of a group add into the same dk, dv, so one
    // thread does them all, in a fixed order
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int kvh = 0; kvh < hl.NKV; kvh++) {
            for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                const float* seq = qkv + (size_t)b * T * hl.row;
                float* dseq = dqkv + (size_t)b * T * hl.row;
                for (int t = 0; t < T; t++) {
                    const float* a = att + (((size_t)b * NH + h) * T + t) * T;
                    float* da = datt + (((size_t)b * NH + h) * T + t) * T;
                    const float* d = dout + ((size_t)b * T + t) * C + h * hs;
                    // through out = att @ v
                    for (int t2 = 0; t2 <= t; t2++) {
                        const float* v = seq + t2 * hl.row + v_offset(&hl, h);
                        float* dv = dseq + t2 * hl.row + v_offset(&hl, h);
                        float s = 0.0f;
                        for (int i = 0; i < hs; i++) { s += d[i] * v[i]; dv[i] += a[t2] * d[i]; }
                        da[t2] = s;
                    }
                    // through the softmax: dpre = att * (datt - sum(att * datt))
                    float dot = 0.0f;
                    for (int t2 = 0; t2 <= t; t2++) dot += a[t2] * da[t2];
                    const float* q = seq + t * hl.row + q_offset(&hl, h);
                    float* dq = dseq + t * hl.row + q_offset(&hl, h);
                    for (int t2 = 0; t2 <= t; t2++) {
                        float dpre = a[t2] * (da[t2] - dot) * scale;
                        const float* k = seq + t2 * hl.row + k_offset(&hl, h);
                        float* dk = dseq + t2 * hl.row + k_offset(&hl, h);
                        for (int i = 0; i < hs; i++) { dq[i] += dpre * k[i]; dk[i] += dpre * q[i]; }
                    }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------
// rope: rotary position embeddings (LLaMA), in transformers' rotate_half layout: channel i
// of the first half of a head pairs with channel i + hs/2, rotated by t * theta^(-2i/hs)

// Rotates the q and k heads of qkv (B,T,QKV) in place: x1' = x1 cos - x2 sin,
// x2' = x2 cos + x1 sin (x1, x2: a head's two halves). direction -1 rotates back, which
// is the backward pass (a rotation's transpose is its inverse): dqkv's q and k in place.
void rope_rotate(float* qkv, const float* cos_t, const float* sin_t, int B, int T, HeadLayout hl, float direction) {
    int half = hl.hs / 2, heads = hl.NH + hl.NKV; // q heads, then k heads: contiguous
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float* row = qkv + ((size_t)b * T + t) * hl.row;
            const float* c = cos_t + (size_t)t * half;
            const float* s = sin_t + (size_t)t * half;
            for (int h = 0; h < heads; h++) {
                float* x = row + (size_t)h * hl.hs;
                for (int i = 0; i < half; i++) {
                    float x1 = x[i], x2 = x[i + half], sn = direction * s[i];
                    x[i] = x1 * c[i] - x2 * sn;
                    x[i + half] = x2 * c[i] + x1 * sn;
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------
// gelu (tanh approximation)

#define GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)

// out (N) = GELU(inp), tanh approximation
void gelu_forward(float* out, const float* inp, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
    }
}

// dinp (N) += GELU'(inp) * dout
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += grad * dout[i];
    }
}

// ----------------------------------------------------------------------------
// swiglu (LLaMA's MLP): silu(gate) * up

// out (N,F) = silu(gate) * up, gate and up the two halves of each row of fch (N,2F)
// (the fused [gate_proj; up_proj] product); silu(x) = x * sigmoid(x)
void swiglu_forward(float* out, const float* fch, int N, int F) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* gate = fch + (size_t)n * 2 * F;
        const float* up = gate + F;
        float* o = out + (size_t)n * F;
        for (int i = 0; i < F; i++) o[i] = gate[i] * (1.0f / (1.0f + expf(-gate[i]))) * up[i];
    }
}

// dfch (N,2F) += d/d(gate, up) of out, from dout (N,F)
void swiglu_backward(float* dfch, const float* fch, const float* dout, int N, int F) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* gate = fch + (size_t)n * 2 * F;
        const float* up = gate + F;
        const float* d = dout + (size_t)n * F;
        float* dgate = dfch + (size_t)n * 2 * F;
        float* dup = dgate + F;
        for (int i = 0; i < F; i++) {
            float sig = 1.0f / (1.0f + expf(-gate[i]));
            float silu = gate[i] * sig;
            dgate[i] += d[i] * up[i] * sig * (1.0f + gate[i] * (1.0f - sig)); // silu' = sig * (1 + x (1 - sig))
            dup[i] += d[i] * silu;
        }
    }
}

// ----------------------------------------------------------------------------
// residual

// out (N) = a + b
void residual_forward(float* out, const float* a, const float* b, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

// da (N) += dout, db (N) += dout
void residual_backward(float* da, float* db, const float* dout, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) { da[i] += dout[i]; db[i] += dout[i]; }
}

// ----------------------------------------------------------------------------
// classifier: softmax over the V real tokens of the padded (N,Vp) logits and cross-entropy

// Softmax over the V real tokens of each row of logits (N,Vp) into probs (N,Vp) (padding
// columns 0) and, with targets, the loss of each row: losses (N) = -log probs[target].
void classifier_forward(float* losses, float* probs, const float* logits, const int* targets, int N, int V, int Vp) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = logits + (size_t)n * Vp;
        float* p = probs + (size_t)n * Vp;
        float maxval = -INFINITY;
        for (int i = 0; i < V; i++) if (x[i] > maxval) maxval = x[i];
        double sum = 0.0;
        for (int i = 0; i < V; i++) { p[i] = expf(x[i] - maxval); sum += p[i]; }
        float inv = (float)(1.0 / sum);
        for (int i = 0; i < V; i++) p[i] *= inv;
        for (int i = V; i < Vp; i++) p[i] = 0.0f;
        // -log p[target] from the log-sum-exp, accurate even when p[target] underflows
        if (targets) losses[n] = (float)(log(sum) - (x[targets[n]] - maxval));
    }
}

// dlogits (N,Vp) = (probs - onehot(target)) * dloss, in place over probs: the padding
// columns of probs are 0, so their gradient is 0
void classifier_backward(float* probs_to_dlogits, const int* targets, float dloss, int N, int Vp) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float* d = probs_to_dlogits + (size_t)n * Vp;
        for (int i = 0; i < Vp; i++) d[i] *= dloss;
        d[targets[n]] -= dloss;
    }
}

// ----------------------------------------------------------------------------
// the model: GPT-2 and LLaMA, one layer loop (parameter layout and initialisation:
// dstrain.h, param_table). The architectures differ in three places, each an `if` below:
//   norm        LayerNorm with bias (GPT-2)       RMSNorm (LLaMA)
//   positions   learned wpe added to the input    rotary, applied to q and k
//   MLP         GELU(fc(x))                       silu(gate(x)) * up(x)
// and LLaMA has no biases, grouped-query attention and (unless tied) its own lm_head.

typedef struct {
    float *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb;
} LayerWeights; // GPT2_LAYER_TENSORS pointers, in GPT-2's layout order; LLaMA's biases NULL

typedef struct {
    float* wte;
    float* wpe;          // GPT-2 only
    LayerWeights* layer; // num_layers
    float* lnfw;
    float* lnfb;         // GPT-2 only
    float* lm_head;      // the classifier's weights: wte when tied
} Weights;

// Points w's tensors into the flat parameter buffer `base` (or a gradient buffer of the same layout).
static void point_weights(Weights* w, float* base, const ModelConfig* c) {
    ParamTable t = param_table(c);
    const ParamTensor *wpe = param_find(&t, "wpe"), *lnfb = param_find(&t, "lnfb"), *lm_head = param_find(&t, "lm_head");
    w->wte = base + param_named(&t, "wte")->offset;
    w->wpe = wpe ? base + wpe->offset : NULL;
    w->layer = (LayerWeights*)callocCheck(c->num_layers, sizeof(LayerWeights));
    for (int l = 0; l < c->num_layers; l++) {
        float** p = (float**)&w->layer[l];
        for (int i = 0; i < t.per_layer; i++) p[c->arch == ARCH_LLAMA ? LLAMA_GPT2_SLOT[i] : i] = base + param_layer(&t, l, i)->offset;
    }
    w->lnfw = base + param_named(&t, "lnfw")->offset;
    w->lnfb = lnfb ? base + lnfb->offset : NULL;
    w->lm_head = lm_head ? base + lm_head->offset : w->wte;
    param_table_free(&t);
}

// Points lg's tensors into `g`, the gradient of the layer whose weights are w, each at its
// weight's offset from the layer's first tensor (a layer's tensors are contiguous); NULL stays NULL.
static void point_layer_grads(LayerWeights* lg, float* g, const LayerWeights* w) {
    float** dst = (float**)lg;
    float* const* src = (float* const*)w;
    for (int i = 0; i < GPT2_LAYER_TENSORS; i++) dst[i] = src[i] ? g + (src[i] - w->ln1w) : NULL;
}

// Activations saved by forward for backward; the gradient buffers reuse the layout
// (without the statistics, logits and probabilities, which have no gradient buffer).
// QKV = (NH + 2*NKV) * hs (3C for GPT-2); F2 = F (GPT-2) or 2F (LLaMA's [gate | up]).
typedef struct {
    float* encoded;   // (B,T,C)
    float* ln1;       // (L,B,T,C)
    float* ln1_mean;  // (L,B,T) GPT-2
    float* ln1_rstd;  // (L,B,T)
    float* qkv;       // (L,B,T,QKV), q and k rotated (LLaMA)
    float* atty;      // (L,B,T,C)
    float* att;       // (L,B,NH,T,T)
    float* attproj;   // (L,B,T,C)
    float* residual2; // (L,B,T,C)
    float* ln2;       // (L,B,T,C)
    float* ln2_mean;  // (L,B,T) GPT-2
    float* ln2_rstd;  // (L,B,T)
    float* fch;       // (L,B,T,F2)
    float* fch_act;   // (L,B,T,F) GELU(fch) or silu(gate) * up
    float* fcproj;    // (L,B,T,C)
    float* residual3; // (L,B,T,C)
    float* lnf;       // (B,T,C)
    float* lnf_mean;  // (B,T) GPT-2
    float* lnf_rstd;  // (B,T)
    float* logits;    // (B,T,Vp)
    float* probs;     // (B,T,Vp), turned into dlogits in backward
    float* losses;    // (B,T)
    float* memory;
    size_t num_floats;
} Activations;


// Points a's tensors into `base` and returns their floats; base NULL: only counts them.
static size_t activations_layout(Activations* a, const ModelConfig* c, int B, int T, int for_grads, float* base) {
    size_t L = c->num_layers, BT = (size_t)B * T, C = c->channels, F = c->ffn_hidden, NH = c->num_heads, Vp = c->padded_vocab_size;
    size_t QKV = qkv_width(c), F2 = fc_width(c);
    size_t fwd = for_grads ? 0 : 1;                        // tensors that only forward needs
    size_t mean = for_grads || c->arch == ARCH_LLAMA ? 0 : 1; // LayerNorm's means
    struct { float** ptr; size_t n; } t[] = {
        {&a->encoded, BT * C}, {&a->ln1, L * BT * C}, {&a->ln1_mean, mean * L * BT}, {&a->ln1_rstd, fwd * L * BT},
        {&a->qkv, L * BT * QKV}, {&a->atty, L * BT * C}, {&a->att, L * B * NH * T * T}, {&a->attproj, L * BT * C},
        {&a->residual2, L * BT * C}, {&a->ln2, L * BT * C}, {&a->ln2_mean, mean * L * BT}, {&a->ln2_rstd, fwd * L * BT},
        {&a->fch, L * BT * F2}, {&a->fch_act, L * BT * F}, {&a->fcproj, L * BT * C}, {&a->residual3, L * BT * C},
        {&a->lnf, BT * C}, {&a->lnf_mean, mean * BT}, {&a->lnf_rstd, fwd * BT},
        {&a->logits, fwd * BT * Vp}, {&a->probs, fwd * BT * Vp}, {&a->losses, fwd * BT},
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        if (base) *t[i].ptr = t[i].n ? base + total : NULL;
        total += t[i].n;
    }
    return total;
}

static void activations_alloc(Activations* a, const ModelConfig* c, int B, int T, int for_grads) {
    a->num_floats = activations_layout(a, c, B, T, for_grads, NULL);
    a->memory = (float*)callocCheck(a->num_floats, sizeof(float));
    activations_layout(a, c, B, T, for_grads, a->memory);
}

typedef struct {
    ModelConfig config;
    HeadLayout heads;
    size_t num_params;
    float* params;     // fp32 working weights (the fp32 master copy and Adam moments belong to ZeRO)
    Weights w;         // tensors inside params
    size_t layer_offset0, layer_size; // flat offset of layer 0 and the size of one layer
    float *rope_cos, *rope_sin; // (max_T, hs/2) LLaMA
    Activations act, dact;
    int max_B, max_T;  // the activations' capacity
    int* targets;      // (B,T) of the last forward, for backward
    int last_B, last_T; // of the last forward
    double loss_sum;    // the mean losses of the forwards since model_take_loss
} Model;

// Layer l's activations: its slices of the per-layer tensors.
typedef struct {
    float* residual; // the layer's input: encoded, or the previous layer's residual3
    float *ln1, *qkv, *atty, *att, *attproj, *residual2, *ln2, *fch, *fch_act, *fcproj, *residual3;
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd;
} LayerActivations;

// layer l's slice of tensor t, n elements per layer; NULL stays NULL (gradients have no statistics)
static float* layer_slice(float* t, int l, size_t n) { return t ? t + l * n : NULL; }

// a: the activations or their gradients (the same layout); per-layer strides use the capacity
static LayerActivations layer_activations(const Model* m, const Activations* a, int l) {
    const ModelConfig* c = &m->config;
    size_t N = (size_t)m->max_B * m->max_T, C = c->channels, F = c->ffn_hidden;
    size_t att = (size_t)m->max_B * c->num_heads * m->max_T * m->max_T;
    LayerActivations la;
    la.residual = l == 0 ? a->encoded : layer_slice(a->residual3, l - 1, N * C);
    la.ln1 = layer_slice(a->ln1, l, N * C);
    la.qkv = layer_slice(a->qkv, l, N * qkv_width(c));
    la.atty = layer_slice(a->atty, l, N * C);
    la.att = layer_slice(a->att, l, att);
    la.attproj = layer_slice(a->attproj, l, N * C);
    la.residual2 = layer_slice(a->residual2, l, N * C);
    la.ln2 = layer_slice(a->ln2, l, N * C);
    la.fch = layer_slice(a->fch, l, N * fc_width(c));
    la.fch_act = layer_slice(a->fch_act, l, N * F);
    la.fcproj = layer_slice(a->fcproj, l, N * C);
    la.residual3 = layer_slice(a->residual3, l, N * C);
    la.ln1_mean = layer_slice(a->ln1_mean, l, N);
    la.ln1_rstd = layer_slice(a->ln1_rstd, l, N);
    la.ln2_mean = layer_slice(a->ln2_mean, l, N);
    la.ln2_rstd = layer_slice(a->ln2_rstd, l, N);
    return la;
}

static void model_build(Model* m, const ModelConfig* c, int B, int T) {
    memset(m, 0, sizeof(*m));
    m->config = *c;
    m->heads = head_layout(c->channels, c->num_heads, c->num_kv_heads);
    m->num_params = model_num_params(c);
    m->params = (float*)callocCheck(m->num_params, sizeof(float));
    point_weights(&m->w, m->params, c);
    m->layer_offset0 = (size_t)(m->w.layer[0].ln1w - m->params);
    m->layer_size = c->num_layers > 1 ? (size_t)(m->w.layer[1].ln1w - m->w.layer[0].ln1w) : (size_t)(m->w.lnfw - m->w.layer[0].ln1w);
    if (c->arch == ARCH_LLAMA) {
        int half = m->heads.hs / 2;
        m->rope_cos = (float*)callocCheck((size_t)T * half, sizeof(float));
        m->rope_sin = (float*)callocCheck((size_t)T * half, sizeof(float));
        rope_tables(m->rope_cos, m->rope_sin, T, m->heads.hs, c->rope_theta);
    }
    activations_alloc(&m->act, c, B, T, 0);
    activations_alloc(&m->dact, c, B, T, 1);
    m->targets = (int*)callocCheck((size_t)B * T, sizeof(int));
    m->max_B = B;
    m->max_T = T;
}

static void model_free(Model* m) {
    free(m->params);
    free(m->w.layer);
    free(m->rope_cos); free(m->rope_sin);
    free(m->act.memory); free(m->dact.memory);
    free(m->targets);
}

// the architecture's norm: LayerNorm (mean saved) or RMSNorm
static void norm_forward(const Model* m, float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N) {
    const ModelConfig* c = &m->config;
    if (c->arch == ARCH_LLAMA) rmsnorm_forward(out, rstd, inp, w, N, c->channels, c->norm_eps);
    else layernorm_forward(out, mean, rstd, inp, w, b, N, c->channels, c->norm_eps);
}

static void norm_backward(const Model* m, float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                          const float* mean, const float* rstd, int N) {
    if (m->config.arch == ARCH_LLAMA) rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, m->config.channels);
    else layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, m->config.channels);
}

// Runs the model on inputs (B,T); with targets, adds the mean loss to the loss sum that
// model_take_loss reads. B, T <= capacity.
static void model_forward(Model* m, const int* inputs, const int* targets, int B, int T) {
    const ModelConfig* c = &m->config;
    if (B > m->max_B || T > m->max_T || T > c->max_seq_len) fatal("forward: batch (%d, %d) exceeds capacity (%d, %d)", B, T, m->max_B, m->max_T);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= c->vocab_size) fatal("input token %d at position %d is outside the vocabulary (%d)", inputs[i], i, c->vocab_size);
        if (targets && (targets[i] < 0 || targets[i] >= c->vocab_size)) fatal("target token %d at position %d is outside the vocabulary (%d)", targets[i], i, c->vocab_size);
    }
    int L = c->num_layers, C = c->channels, F = c->ffn_hidden, V = c->vocab_size, Vp = c->padded_vocab_size, llama = c->arch == ARCH_LLAMA;
    int QKV = (int)qkv_width(c), F2 = (int)fc_width(c);
    size_t BT = (size_t)B * T;
    m->last_B = B;
    m->last_T = T;
    if (targets) memcpy(m->targets, targets, BT * sizeof(int));
    Activations* a = &m->act;
    encoder_forward(a->encoded, inputs, m->w.wte, m->w.wpe, B, T, C);
    for (int l = 0; l < L; l++) {
        const LayerWeights* w = &m->w.layer[l];
        LayerActivations la = layer_activations(m, a, l);
        norm_forward(m, la.ln1, la.ln1_mean, la.ln1_rstd, la.residual, w->ln1w, w->ln1b, BT);
        matmul_forward(la.qkv, la.ln1, w->qkvw, w->qkvb, BT, C, QKV);
        if (llama) rope_rotate(la.qkv, m->rope_cos, m->rope_sin, B, T, m->heads, 1.0f);
        attention_forward(la.atty, la.att, la.qkv, B, T, m->heads);
        matmul_forward(la.attproj, la.atty, w->attprojw, w->attprojb, BT, C, C);
        residual_forward(la.residual2, la.residual, la.attproj, BT * C);
        norm_forward(m, la.ln2, la.ln2_mean, la.ln2_rstd, la.residual2, w->ln2w, w->ln2b, BT);
        matmul_forward(la.fch, la.ln2, w->fcw, w->fcb, BT, C, F2);
        if (llama) swiglu_forward(la.fch_act, la.fch, BT, F);
        else gelu_forward(la.fch_act, la.fch, BT * F);
        matmul_forward(la.fcproj, la.fch_act, w->fcprojw, w->fcprojb, BT, F, C);
        residual_forward(la.residual3, la.residual2, la.fcproj, BT * C);
    }
    norm_forward(m, a->lnf, a->lnf_mean, a->lnf_rstd, layer_activations(m, a, L - 1).residual3, m->w.lnfw, m->w.lnfb, BT);
    matmul_forward(a->logits, a->lnf, m->w.lm_head, NULL, BT, C, Vp);
    classifier_forward(a->losses, a->probs, a->logits, targets, BT, V, Vp);
    if (!targets) return;
    double sum = 0.0;
    for (size_t i = 0; i < BT; i++) sum += a->losses[i];
    m->loss_sum += (float)(sum / BT);
}

// The sum of the mean losses of the forwards since the last call, which starts a new sum.
static double model_take_loss(Model* m) {
    double sum = m->loss_sum;
    m->loss_sum = 0.0;
    return sum;
}

// The gradient of dloss_scale * (mean loss of the last forward, which had targets),
// accumulated (+=) into the buffers the sink gives for each region of parameters, handed
// back from the end of the flat buffer to its start: lm_head (untied), the final norm,
// layers L-1 .. 0, positions (GPT-2), and last the token embedding. A tied embedding is
// taken first, for the classifier's gradient, and handed back last.
// inputs: those of that forward.
static void model_backward(Model* m, const int* inputs, int B, int T, float dloss_scale, GradSink* sink) {
    const ModelConfig* c = &m->config;
    if (B != m->last_B || T != m->last_T) fatal("backward: batch (%d, %d) is not that of the last forward (%d, %d)", B, T, m->last_B, m->last_T);
    int L = c->num_layers, C = c->channels, F = c->ffn_hidden, Vp = c->padded_vocab_size, llama = c->arch == ARCH_LLAMA;
    int QKV = (int)qkv_width(c), F2 = (int)fc_width(c);
    size_t BT = (size_t)B * T;
    Activations *a = &m->act, *d = &m->dact;
    size_t wte_n = (size_t)Vp * C, head_off = (size_t)(m->w.lm_head - m->params);
    size_t lnf_off = (size_t)(m->w.lnfw - m->params), lnf_n = (m->w.lnfb ? 2 : 1) * (size_t)C;
    // gradients of activations are accumulated with +=, so start each backward from zero
    memset(d->memory, 0, d->num_floats * sizeof(float));
    float* dhead = sink->region(sink, head_off, wte_n);
    classifier_backward(a->probs, m->targets, dloss_scale / (float)BT, BT, Vp);
    matmul_backward_weight(dhead, a->probs, a->lnf, BT, C, Vp);
    matmul_backward_input(d->lnf, a->probs, m->w.lm_head, BT, C, Vp);
    if (!c->tied) sink->done(sink, head_off, wte_n);
    float* dlnf = sink->region(sink, lnf_off, lnf_n);
    norm_backward(m, layer_activations(m, d, L - 1).residual3, dlnf, m->w.lnfb ? dlnf + C : NULL, d->lnf, layer_activations(m, a, L - 1).residual3,
                  m->w.lnfw, a->lnf_mean, a->lnf_rstd, BT);
    sink->done(sink, lnf_off, lnf_n);
    for (int l = L - 1; l >= 0; l--) {
        const LayerWeights* w = &m->w.layer[l];
        LayerWeights g;
        size_t layer_off = m->layer_offset0 + l * m->layer_size;
        point_layer_grads(&g, sink->region(sink, layer_off, m->layer_size), w);
        LayerActivations la = layer_activations(m, a, l), dla = layer_activations(m, d, l);
        // residual3 = residual2 + fcproj(act(fc(ln2)))
        residual_backward(dla.residual2, dla.fcproj, dla.residual3, BT * C);
        matmul_backward_weight(g.fcprojw, dla.fcproj, la.fch_act, BT, F, C);
        if (g.fcprojb) bias_backward(g.fcprojb, dla.fcproj, BT, C);
        matmul_backward_input(dla.fch_act, dla.fcproj, w->fcprojw, BT, F, C);
        if (llama) swiglu_backward(dla.fch, la.fch, dla.fch_act, BT, F);
        else gelu_backward(dla.fch, la.fch, dla.fch_act, BT * F);
        matmul_backward_weight(g.fcw, dla.fch, la.ln2, BT, C, F2);
        if (g.fcb) bias_backward(g.fcb, dla.fch, BT, F2);
        matmul_backward_input(dla.ln2, dla.fch, w->fcw, BT, C, F2);
        norm_backward(m, dla.residual2, g.ln2w, g.ln2b, dla.ln2, la.residual2, w->ln2w, la.ln2_mean, la.ln2_rstd, BT);
        // residual2 = residual + attproj(attention(rope(qkv(ln1))))
        residual_backward(dla.residual, dla.attproj, dla.residual2, BT * C);
        matmul_backward_weight(g.attprojw, dla.attproj, la.atty, BT, C, C);
        if (g.attprojb) bias_backward(g.attprojb, dla.attproj, BT, C);
        matmul_backward_input(dla.atty, dla.attproj, w->attprojw, BT, C, C);
        attention_backward(dla.qkv, dla.att, dla.atty, la.qkv, la.att, B, T, m->heads);
        if (llama) rope_rotate(dla.qkv, m->rope_cos, m->rope_sin, B, T, m->heads, -1.0f);
        matmul_backward_weight(g.qkvw, dla.qkv, la.ln1, BT, C, QKV);
        if (g.qkvb) bias_backward(g.qkvb, dla.qkv, BT, QKV);
        matmul_backward_input(dla.ln1, dla.qkv, w->qkvw, BT, C, QKV);
        norm_backward(m, dla.residual, g.ln1w, g.ln1b, dla.ln1, la.residual, w->ln1w, la.ln1_mean, la.ln1_rstd, BT);
        sink->done(sink, layer_off, m->layer_size);
    }
    float* dwpe = NULL;
    size_t wpe_off = m->w.wpe ? (size_t)(m->w.wpe - m->params) : 0, wpe_n = (size_t)c->max_seq_len * C;
    if (m->w.wpe) dwpe = sink->region(sink, wpe_off, wpe_n);
    float* dwte = c->tied ? dhead : sink->region(sink, 0, wte_n);
    encoder_backward(dwte, dwpe, d->encoded, inputs, B, T, C);
    if (m->w.wpe) sink->done(sink, wpe_off, wpe_n);
    sink->done(sink, 0, wte_n);
}

// ----------------------------------------------------------------------------
// fast matmul: the blocked GEMM behind matmul_forward, matmul_backward_input and
// matmul_backward_weight, parallelised with OpenMP

/*
Checks (against the plain loops of section "matmul") and benchmark: dev/cpu/matmul.c.
The kernel relies on the compiler fusing a * b + c into FMAs: GCC does so by default (-std=gnu*),
but not with -std=c11 and the like, which then need -ffp-contract=fast (no -ffast-math needed).

The three products of a Linear layer are one routine, gemm(): C (M, N) (+)= A (M, K) @ B (K, N)
  forward:  out      = inp    @ weight^T + bias   M = BT, N = OC, K = C
  backward: dinp    += dout   @ weight            M = BT, N = C,  K = OC
            dweight += dout^T @ inp               M = OC, N = C,  K = BT

Blocking (BLIS style), sized for an AVX-512 core with 48 KiB L1d and 2 MiB L2:
  - register tile GEMM_MR x GEMM_NR = 8 x 48: 8 * 3 = 24 zmm accumulators, 3 zmm of B and one broadcast of A,
    out of 32 registers. One k step is 3 vector loads, 8 broadcasts and 24 FMAs, so the two FMA ports,
    not the loads, are the limit, and 24 independent accumulators cover the FMA latency. GEMM_NR = 48 divides
    C = 768, 3072 and OC = 2304, 50304, GEMM_MR = 8 divides BT and every OC, so the GPT-2 shapes have no edges.
  - GEMM_KC = 256 (the depth of one block): the kernel keeps an GEMM_MR x GEMM_KC sliver of A (8 KiB) in L1 while it
    sweeps the GEMM_NR-wide slivers of the GEMM_KC x GEMM_NC block of B (384 KiB), which stays in L2 along with the
    GEMM_MC x GEMM_KC block of A (256 KiB) and the GEMM_MC x GEMM_NC tile of C.
  - GEMM_MC x GEMM_NC = 256 x 384 output tiles are the unit of parallel work (fewer rows when there would be fewer
    tiles than threads): every tile is computed by one thread, over K in GEMM_KC steps in a fixed order,
    so the results do not depend on the number of threads.
Operands are used in place when their layout already suits the kernel, otherwise copied ("packed"):
  - A is read by broadcasts, so any layout works if one index is contiguous: a k-contiguous A
    (inp, dout) is copied row by row into a (GEMM_MC, GEMM_KC) block, giving the kernel constant offsets between
    rows; an i-contiguous A (dout^T) is read in place.
  - B is read as GEMM_NR-wide vectors and must be contiguous along N: dinp's weight and dweight's inp are
    read in place; forward's weight^T is packed, 16 x 16 blocks at a time, into GEMM_NR-wide slivers.
Scratch: the packed blocks live in one static buffer (640 KiB per thread), allocated on the
first call and regrown only if the thread count grows; it stays reachable (no leak) and is reused by
every call. So the functions are not reentrant: call them from one thread at a time (the trainer does).
*/
#ifdef __cplusplus
#define restrict __restrict__ // the CUDA tests and kernel checks compile this file as C++
#endif
#define GEMM_MR 8     // rows of the register tile (broadcasts of A)
#define GEMM_NR 48    // columns of the register tile (3 vectors of 16 floats of B)
#define GEMM_KC 256   // depth of a block
#define GEMM_MC 256   // rows of an output tile
#define GEMM_NC 384   // columns of an output tile

// GCC vector extensions: one zmm register with AVX-512; without it the compiler splits them (slower, same results)
typedef float vec16 __attribute__((vector_size(64)));
typedef int ivec16 __attribute__((vector_size(64)));
typedef float vec16_unaligned __attribute__((vector_size(64), aligned(4), may_alias));
#define AT16(p) (*(vec16_unaligned*)(p))  // the 16 floats at p (any alignment), to load or store

// dst[k * ldd + j] = src[j * lds + k] for a 16 x 16 block (16 loads, 64 shuffles, 16 stores)
static inline void transpose16(float* dst, long ldd, const float* src, long lds) {
    const ivec16 lo1 = {0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29}, hi1 = lo1 + 2;
    const ivec16 lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}, hi2 = lo2 + 2;
    const ivec16 lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}, hi4 = lo4 + 4;
    vec16 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = AT16(src + i * lds);
    for (int i = 0; i < 16; i += 2) {  // interleave single floats of row pairs
        t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
    }
    for (int i = 0; i < 16; i += 4)  // then pairs of floats: each 128-bit lane now holds 4 x 4 transposed
        for (int c = 0; c < 2; c++) {
            r[i + 2 * c] = __builtin_shuffle(t[i + c], t[i + 2 + c], lo2);
            r[i + 2 * c + 1] = __builtin_shuffle(t[i + c], t[i + 2 + c], hi2);
        }
    for (int i = 0; i < 16; i += 8)  // then 128-bit lanes, twice
        for (int c = 0; c < 4; c++) {
            t[i + c] = __builtin_shuffle(r[i + c], r[i + 4 + c], lo4);
            t[i + 4 + c] = __builtin_shuffle(r[i + c], r[i + 4 + c], hi4);
        }
    for (int c = 0; c < 8; c++) {
        r[c] = __builtin_shuffle(t[c], t[8 + c], lo4);
        r[8 + c] = __builtin_shuffle(t[c], t[8 + c], hi4);
    }
    for (int i = 0; i < 16; i++) AT16(dst + i * ldd) = r[i];
}

// c (mr, nr) = (accumulate ? c : bias or 0) + a (GEMM_MR, kc) @ b (kc, GEMM_NR), keeping only the top-left mr x nr.
// a(i, k) is a[i * GEMM_KC + k] if a_rows (a packed block) else a[k * lda + i]; b(k, j) is b[k * ldb + j].
static inline __attribute__((always_inline)) void kernel(int kc, const float* restrict a, int a_rows, long lda,
                                                         const float* restrict b, long ldb, float* restrict c,
                                                         long ldc, int mr, int nr, int accumulate, const float* bias) {
    vec16 acc[GEMM_MR][GEMM_NR / 16] = {0};
    for (int k = 0; k < kc; k++, b += ldb) {
        vec16 bv[GEMM_NR / 16];
        for (int v = 0; v < GEMM_NR / 16; v++) bv[v] = AT16(b + 16 * v);
        for (int i = 0; i < GEMM_MR; i++) {
            float ai = a_rows ? a[i * GEMM_KC + k] : a[k * lda + i];
            for (int v = 0; v < GEMM_NR / 16; v++) acc[i][v] += ai * bv[v];
        }
    }
    if (mr == GEMM_MR && nr == GEMM_NR) {
        for (int i = 0; i < GEMM_MR; i++)
            for (int v = 0; v < GEMM_NR / 16; v++) {
                vec16 base = {0};
                if (accumulate) base = AT16(c + i * ldc + 16 * v);
                else if (bias) base = AT16(bias + 16 * v);
                AT16(c + i * ldc + 16 * v) = base + acc[i][v];
            }
    } else {  // a tile on the edge of C
        float tile[GEMM_MR][GEMM_NR];
        for (int i = 0; i < GEMM_MR; i++)
            for (int v = 0; v < GEMM_NR / 16; v++) AT16(&tile[i][16 * v]) = acc[i][v];
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                c[i * ldc + j] = (accumulate ? c[i * ldc + j] : bias ? bias[j] : 0.0f) + tile[i][j];
    }
}

// C (M, N) (+)= A (M, K) @ B (K, N), with A(i, k) = A[i * ars + k * acs], B(k, j) = B[k * brs + j * bcs]
// and C(i, j) = C[i * ldc + j]. Each of A and B must be contiguous along one index (a stride of 1).
// accumulate = 0: C = bias (N, or NULL for 0) + A @ B.
static void gemm(int M, int N, int K, const float* A, long ars, long acs, const float* B, long brs, long bcs,
                 float* C, long ldc, int accumulate, const float* bias) {
    const long per_thread = GEMM_MC * GEMM_KC + GEMM_KC * GEMM_NC;  // floats of scratch per thread: packed A block, packed B block
    static float* scratch = NULL;
    static int scratch_threads = 0;
    if (omp_get_max_threads() > scratch_threads) {
        free(scratch);
        scratch_threads = omp_get_max_threads();
        scratch = (float*)aligned_alloc(64, sizeof(float) * per_thread * scratch_threads);
        if (scratch == NULL) fatal("matmul: out of memory for %zu bytes of scratch", sizeof(float) * per_thread * scratch_threads);
    }
    int a_rows = acs == 1;  // A contiguous along K: copy its rows; else contiguous along M: use in place
    int nt = (N + GEMM_NC - 1) / GEMM_NC, tm = GEMM_MC;  // tiles of tm rows (at most GEMM_MC) and GEMM_NC columns
    while (tm > GEMM_MR && (M + tm - 1) / tm * nt < omp_get_max_threads()) tm /= 2;  // enough tiles for all threads
    int mt = (M + tm - 1) / tm;
    #pragma omp parallel
    {
        float* pa = scratch + per_thread * omp_get_thread_num();
        float* pb = pa + GEMM_MC * GEMM_KC;
        #pragma omp for schedule(static)
        for (int t = 0; t < mt * nt; t++) {
            int i0 = (t / nt) * tm, j0 = (t % nt) * GEMM_NC;
            int mc = M - i0 < tm ? M - i0 : tm, nc = N - j0 < GEMM_NC ? N - j0 : GEMM_NC;
            // A in place needs whole GEMM_MR slivers; B in place needs whole GEMM_NR slivers and stride 1 along N
            int a_packed = a_rows || mc % GEMM_MR, b_packed = bcs != 1 || nc % GEMM_NR;
            for (int k0 = 0; k0 < K; k0 += GEMM_KC) {
                int kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC;
                const float* Ab = A + i0 * ars + k0 * acs;
                const float* Bb = B + k0 * brs + j0 * bcs;
                int mc_pad = (mc + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
                if (a_rows) {  // pa (mc_pad, GEMM_KC) = A block, zero rows below mc
                    for (int i = 0; i < mc_pad; i++)
                        if (i < mc) memcpy(pa + i * GEMM_KC, Ab + i * ars, kc * sizeof(float));
                        else memset(pa + i * GEMM_KC, 0, kc * sizeof(float));
                } else if (a_packed) {  // pa (kc, GEMM_MC) = A block^T, zero columns right of mc
                    for (int k = 0; k < kc; k++) {
                        memcpy(pa + k * GEMM_MC, Ab + k * acs, mc * sizeof(float));
                        memset(pa + k * GEMM_MC + mc, 0, (mc_pad - mc) * sizeof(float));
                    }
                }
                if (b_packed) {  // pb: GEMM_NR-wide slivers of the B block, each (kc, GEMM_NR), zero columns right of nc
                    for (int j = 0; j < (nc + GEMM_NR - 1) / GEMM_NR * GEMM_NR; j += 16)
                        for (int k = 0; k < kc; k += 16) {
                            float* dst = pb + (j / GEMM_NR) * GEMM_NR * kc + j % GEMM_NR;
                            if (bcs != 1 && k + 16 <= kc && j + 16 <= nc)
                                transpose16(dst + k * GEMM_NR, GEMM_NR, Bb + j * bcs + k * brs, bcs);
                            else
                                for (int kk = k; kk < k + 16 && kk < kc; kk++)
                                    for (int jj = 0; jj < 16; jj++)
                                        dst[kk * GEMM_NR + jj] = j + jj < nc ? Bb[kk * brs + (j + jj) * bcs] : 0.0f;
                        }
                }
                for (int is = 0; is < mc; is += GEMM_MR) {
                    const float* a = a_rows ? pa + is * GEMM_KC : a_packed ? pa + is : Ab + is;
                    long lda = a_packed ? GEMM_MC : acs;
                    for (int js = 0; js < nc; js += GEMM_NR) {
                        const float* b = b_packed ? pb + js * kc : Bb + js;
                        long ldb = b_packed ? GEMM_NR : brs;
                        float* c = C + (i0 + is) * ldc + j0 + js;
                        int mr = mc - is < GEMM_MR ? mc - is : GEMM_MR, nr = nc - js < GEMM_NR ? nc - js : GEMM_NR;
                        int acc = accumulate || k0 > 0;
                        const float* bi = bias ? bias + j0 + js : NULL;
                        if (a_rows) kernel(kc, a, 1, 0, b, ldb, c, ldc, mr, nr, acc, bi);  // two copies of the
                        else kernel(kc, a, 0, lda, b, ldb, c, ldc, mr, nr, acc, bi);       // kernel, one per A layout
                    }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------
// optimizer buffers: the arithmetic ZeRO does on gradients, master weights and moments
// (dstrain.h's BufferOps), on host memory with OpenMP

static void* host_alloc(size_t bytes) { return callocCheck(1, bytes); }
static void host_release(void* p) { free(p); }
static void host_copy(float* dst, const float* src, size_t n) { memmove(dst, src, n * sizeof(float)); }
static void host_zero(float* dst, size_t n) { memset(dst, 0, n * sizeof(float)); }

static void host_add_scaled(float* dst, const float* src, float scale, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) dst[i] += scale * src[i];
}

static void host_scale(float* dst, float s, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) dst[i] *= s;
}

// any inf/nan in the gradients, and their sum of squares
static void host_stats(const float* g, size_t n, int* nonfinite, double* sumsq) {
    int bad = 0;
    double ss = 0.0;
    #pragma omp parallel for reduction(|:bad) reduction(+:ss)
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(g[i])) bad = 1;
        ss += (double)g[i] * g[i];
    }
    *nonfinite = bad;
    *sumsq = ss;
}

// AdamW with DeepSpeed's semantics (doc/deepspeed.md section 5) over n parameters.
// The gradients are multiplied by p->grad_factor first: unscale and clip in one factor.
static void host_adamw(float* params, float* m, float* v, const float* grads, size_t n, const StepPlan* p, const DSConfig* c) {
    float b1 = (float)c->betas[0], b2 = (float)c->betas[1], eps = (float)c->eps, wd = (float)c->weight_decay, lr = p->lr;
    float bc1 = 1.0f - powf(b1, (float)p->adam_t), bc2 = 1.0f - powf(b2, (float)p->adam_t);
    int decoupled = c->adam_w_mode;
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float g = grads[i] * p->grad_factor;
        if (!decoupled) g += wd * params[i]; // adam_w_mode false: L2 in the gradient
        m[i] = b1 * m[i] + (1.0f - b1) * g;
        v[i] = b2 * v[i] + (1.0f - b2) * g * g;
        float update = (m[i] / bc1) / (sqrtf(v[i] / bc2) + eps);
        if (decoupled) update += wd * params[i];
        params[i] -= lr * update;
    }
}

static const BufferOps HOST_BUFFERS = {host_alloc, host_release, host_copy, host_zero, host_add_scaled, host_scale,
                                       host_stats, host_adamw, host_copy, host_copy};

// ----------------------------------------------------------------------------
// the trainer: the model behind dstrain.h's ModelOps; the training driver is train_main

static void* cpu_build(const ModelConfig* c, int B, int T, const Options* opt) {
    (void)opt; // --recompute saves GPU memory; the CPU trainer keeps every activation
    Model* m = (Model*)mallocCheck(sizeof(Model));
    model_build(m, c, B, T);
    return m;
}
static size_t cpu_num_params(void* m) { return ((Model*)m)->num_params; }
static void* cpu_weights(void* model, size_t* elem_size) { *elem_size = sizeof(float); return ((Model*)model)->params; }
static void cpu_set_weights(void* model, size_t offset, const float* master, size_t n) { memcpy(((Model*)model)->params + offset, master, n * sizeof(float)); }
static void cpu_forward(void* m, const int* inputs, const int* targets, int B, int T) { model_forward((Model*)m, inputs, targets, B, T); }
static double cpu_take_loss(void* m) { return model_take_loss((Model*)m); }
static void cpu_backward(void* m, const int* inputs, int B, int T, float dloss_scale, GradSink* sink) { model_backward((Model*)m, inputs, B, T, dloss_scale, sink); }
static const float* cpu_probs(void* model, int position) { Model* m = (Model*)model; return m->act.probs + (size_t)position * m->config.padded_vocab_size; }
static void cpu_describe_memory(void* model) {
    Model* m = (Model*)model;
    printf("  activations: %.1f MB (forward) + %.1f MB (their gradients)\n", m->act.num_floats * 4 / 1e6, m->dact.num_floats * 4 / 1e6);
}
static double cpu_plan_memory(const ModelConfig* c, int B, int T, const Options* opt, size_t* weight_bytes) {
    (void)opt;
    Activations a;
    *weight_bytes = sizeof(float);
    return 4.0 * (activations_layout(&a, c, B, T, 0, NULL) + activations_layout(&a, c, B, T, 1, NULL));
}
static void cpu_free(void* model) { model_free((Model*)model); free(model); }

// Says plainly which configured features this run does without.
static void cpu_describe_run(const DSConfig* c, const Comm* comm) {
#ifdef _OPENMP
    printf("threads: %d OpenMP threads per rank\n", omp_get_max_threads());
#endif
    if (c->zero_stage > 0 && comm->world_size == 1) printf("note: zero_optimization.stage %lld with 1 rank: the one partition holds every parameter\n", (long long)c->zero_stage);
    if (c->overlap_comm && comm->world_size > 1 && c->zero_stage == 2) printf("note: overlap_comm: gradient buckets are reduced with non-blocking MPI while backward goes on\n");
    if (c->bf16_enabled) printf("note: bf16.enabled: the CPU trainer computes in fp32 (bf16 is a GPU trainer precision)\n");
    if (c->fp16_enabled) printf("note: fp16.enabled: the CPU trainer computes in fp32 and applies DeepSpeed's loss scaling to the fp32 gradients\n");
}

static const ModelOps CPU_OPS = {"CPU trainer (fp32, OpenMP)", comm_init_host, cpu_describe_run, &HOST_BUFFERS, cpu_build, cpu_num_params,
                                 cpu_weights, cpu_set_weights, cpu_forward, cpu_take_loss, cpu_backward, cpu_probs, cpu_describe_memory, cpu_plan_memory, NULL, NULL, cpu_free};

#ifndef TESTING
int main(int argc, char** argv) {
    return train_main(argc, argv, &CPU_OPS);
}
#endif
