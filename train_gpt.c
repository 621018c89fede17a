/*
train_gpt.c: the CPU reference trainer. GPT-2 in fp32 with OpenMP, trained the way
DeepSpeed trains it (ds_config.json, AdamW, schedules, clipping, gradient accumulation,
fp16 loss scaling semantics). Everything that is not model math (config, batch rules,
schedules, loss scaler, data loader, checkpoints, logs, command line) is in dstrain.h.

Each layer is a pair of functions, xxx_forward / xxx_backward, with the tensor shapes in
a comment; backward functions accumulate into gradients with +=.

    make train_gpt_cpu && ./train_gpt_cpu --help
*/
#include "dstrain.h"

// ----------------------------------------------------------------------------
// layers

// out (B,T,C) = wte[inp] + wpe[t]
void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) {
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float* o = out + ((size_t)b * T + t) * C;
            const float* we = wte + (size_t)inp[b * T + t] * C;
            const float* pe = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) o[i] = we[i] + pe[i];
        }
    }
}

// dwte (Vp,C) += scatter of dout (B,T,C) by token; dwpe (maxT,C) += sum over B
void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) {
    // parallel over channels: rows of dwte repeat when a token repeats, channels never collide
    #pragma omp parallel for
    for (int i = 0; i < C; i++) {
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                float d = dout[((size_t)b * T + t) * C + i];
                dwte[(size_t)inp[b * T + t] * C + i] += d;
                dwpe[(size_t)t * C + i] += d;
            }
        }
    }
}

// out (N,C) = (inp - mean) * rstd * weight + bias, per row; saves mean, rstd (N) for backward
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias, int N, int C) {
    const float eps = 1e-5f;
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

// out (BT,OC) = inp (BT,C) @ weight^T (C,OC) + bias (OC); weight (OC,C) as in PyTorch
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int BT, int C, int OC) {
    #pragma omp parallel for collapse(2)
    for (int r = 0; r < BT; r++) {
        for (int o = 0; o < OC; o++) {
            const float* x = inp + (size_t)r * C;
            const float* w = weight + (size_t)o * C;
            float acc = bias ? bias[o] : 0.0f;
            for (int i = 0; i < C; i++) acc += x[i] * w[i];
            out[(size_t)r * OC + o] = acc;
        }
    }
}

// dinp (BT,C) += dout @ weight; dweight (OC,C) += dout^T @ inp; dbias (OC) += sum of dout
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp, const float* weight, int BT, int C, int OC) {
    #pragma omp parallel for
    for (int r = 0; r < BT; r++) {
        const float* d = dout + (size_t)r * OC;
        float* dx = dinp + (size_t)r * C;
        for (int o = 0; o < OC; o++) {
            const float* w = weight + (size_t)o * C;
            for (int i = 0; i < C; i++) dx[i] += d[o] * w[i];
        }
    }
    #pragma omp parallel for
    for (int o = 0; o < OC; o++) {
        float* dw = dweight + (size_t)o * C;
        float db = 0.0f;
        for (int r = 0; r < BT; r++) {
            float d = dout[(size_t)r * OC + o];
            const float* x = inp + (size_t)r * C;
            for (int i = 0; i < C; i++) dw[i] += d * x[i];
            db += d;
        }
        if (dbias) dbias[o] += db;
    }
}

// Causal self-attention. qkv (B,T,3C) holds [q | k | v]; head h uses channels h*hs..(h+1)*hs.
// out (B,T,C); att (B,NH,T,T) saves the softmax for backward (zero above the diagonal).
void attention_forward(float* out, float* att, const float* qkv, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    size_t C3 = 3 * (size_t)C;
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float* q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float* a = att + (((size_t)b * NH + h) * T + t) * T;
                float maxval = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* k = qkv + ((size_t)b * T + t2) * C3 + C + h * hs;
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
                    const float* v = qkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
                    for (int i = 0; i < hs; i++) o[i] += a[t2] * v[i];
                }
            }
        }
    }
}

// dqkv (B,T,3C) += ..., from dout (B,T,C); datt (B,NH,T,T) is scratch
void attention_backward(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    size_t C3 = 3 * (size_t)C;
    // parallel over (b, h): a head's q, k, v gradients are written by its own thread only
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float* a = att + (((size_t)b * NH + h) * T + t) * T;
                float* da = datt + (((size_t)b * NH + h) * T + t) * T;
                const float* d = dout + ((size_t)b * T + t) * C + h * hs;
                // through out = att @ v
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* v = qkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
                    float* dv = dqkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) { s += d[i] * v[i]; dv[i] += a[t2] * d[i]; }
                    da[t2] = s;
                }
                // through the softmax: dpre = att * (datt - sum(att * datt))
                float dot = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) dot += a[t2] * da[t2];
                const float* q = qkv + ((size_t)b * T + t) * C3 + h * hs;
                float* dq = dqkv + ((size_t)b * T + t) * C3 + h * hs;
                for (int t2 = 0; t2 <= t; t2++) {
                    float dpre = a[t2] * (da[t2] - dot) * scale;
                    const float* k = qkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                    float* dk = dqkv + ((size_t)b * T + t2) * C3 + C + h * hs;
                    for (int i = 0; i < hs; i++) { dq[i] += dpre * k[i]; dk[i] += dpre * q[i]; }
                }
            }
        }
    }
}

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

// Softmax over the V real tokens of each row of logits (N,Vp) into probs (N,Vp) (padding
// columns 0) and, with targets, the loss of each row: losses (N) = -log probs[target].
void softmax_crossentropy_forward(float* probs, float* losses, const float* logits, const int* targets, int N, int V, int Vp) {
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
void softmax_crossentropy_backward(float* probs_to_dlogits, const int* targets, float dloss, int N, int Vp) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float* d = probs_to_dlogits + (size_t)n * Vp;
        for (int i = 0; i < Vp; i++) d[i] *= dloss;
        d[targets[n]] -= dloss;
    }
}

// ----------------------------------------------------------------------------
// GPT-2: parameters in one flat buffer, laid out layer by layer (so a layer's
// gradients are contiguous and a ZeRO bucket covers whole layers):
//   wte (Vp,C), wpe (maxT,C),
//   per layer: ln1w (C), ln1b (C), qkvw (3C,C), qkvb (3C), attprojw (C,C), attprojb (C),
//              ln2w (C), ln2b (C), fcw (4C,C), fcb (4C), fcprojw (C,4C), fcprojb (C),
//   lnfw (C), lnfb (C)

#define NUM_LAYER_TENSORS 12

typedef struct {
    float *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb;
} LayerWeights;

typedef struct {
    float* wte;
    float* wpe;
    LayerWeights* layer; // num_layers
    float* lnfw;
    float* lnfb;
} Weights;

static void layer_tensor_sizes(size_t s[NUM_LAYER_TENSORS], const ModelConfig* c) {
    size_t C = c->channels, F = c->ffn_hidden;
    size_t sizes[NUM_LAYER_TENSORS] = {C, C, 3 * C * C, 3 * C, C * C, C, C, C, F * C, F, C * F, C};
    memcpy(s, sizes, sizeof(sizes));
}

static size_t gpt2_num_params(const ModelConfig* c) {
    size_t s[NUM_LAYER_TENSORS], per_layer = 0;
    layer_tensor_sizes(s, c);
    for (int i = 0; i < NUM_LAYER_TENSORS; i++) per_layer += s[i];
    return (size_t)c->padded_vocab_size * c->channels + (size_t)c->max_seq_len * c->channels + c->num_layers * per_layer + 2 * (size_t)c->channels;
}

// Points w's tensors into the flat buffer `base` (params or grads).
static void gpt2_point_weights(Weights* w, float* base, const ModelConfig* c) {
    size_t s[NUM_LAYER_TENSORS];
    layer_tensor_sizes(s, c);
    float* p = base;
    w->wte = p; p += (size_t)c->padded_vocab_size * c->channels;
    w->wpe = p; p += (size_t)c->max_seq_len * c->channels;
    w->layer = (LayerWeights*)callocCheck(c->num_layers, sizeof(LayerWeights));
    for (int l = 0; l < c->num_layers; l++) {
        float** t = (float**)&w->layer[l]; // LayerWeights is NUM_LAYER_TENSORS pointers in layout order
        for (int i = 0; i < NUM_LAYER_TENSORS; i++) { t[i] = p; p += s[i]; }
    }
    w->lnfw = p; p += c->channels;
    w->lnfb = p;
}

// Activations saved by forward for backward; the gradient buffers reuse the layout
// (without the statistics, logits and probabilities, which have no gradient buffer).
typedef struct {
    float* encoded;   // (B,T,C)
    float* ln1;       // (L,B,T,C)
    float* ln1_mean;  // (L,B,T)
    float* ln1_rstd;  // (L,B,T)
    float* qkv;       // (L,B,T,3C)
    float* atty;      // (L,B,T,C)
    float* att;       // (L,B,NH,T,T)
    float* attproj;   // (L,B,T,C)
    float* residual2; // (L,B,T,C)
    float* ln2;       // (L,B,T,C)
    float* ln2_mean;  // (L,B,T)
    float* ln2_rstd;  // (L,B,T)
    float* fch;       // (L,B,T,4C)
    float* fch_gelu;  // (L,B,T,4C)
    float* fcproj;    // (L,B,T,C)
    float* residual3; // (L,B,T,C)
    float* lnf;       // (B,T,C)
    float* lnf_mean;  // (B,T)
    float* lnf_rstd;  // (B,T)
    float* logits;    // (B,T,Vp)
    float* probs;     // (B,T,Vp), turned into dlogits in backward
    float* losses;    // (B,T)
    float* memory;
    size_t num_floats;
} Activations;

static void activations_alloc(Activations* a, const ModelConfig* c, int B, int T, int for_grads) {
    size_t L = c->num_layers, BT = (size_t)B * T, C = c->channels, F = c->ffn_hidden, NH = c->num_heads, Vp = c->padded_vocab_size;
    size_t fwd = for_grads ? 0 : 1; // tensors that only forward needs
    struct { float** ptr; size_t n; } t[] = {
        {&a->encoded, BT * C}, {&a->ln1, L * BT * C}, {&a->ln1_mean, fwd * L * BT}, {&a->ln1_rstd, fwd * L * BT},
        {&a->qkv, L * BT * 3 * C}, {&a->atty, L * BT * C}, {&a->att, L * B * NH * T * T}, {&a->attproj, L * BT * C},
        {&a->residual2, L * BT * C}, {&a->ln2, L * BT * C}, {&a->ln2_mean, fwd * L * BT}, {&a->ln2_rstd, fwd * L * BT},
        {&a->fch, L * BT * F}, {&a->fch_gelu, L * BT * F}, {&a->fcproj, L * BT * C}, {&a->residual3, L * BT * C},
        {&a->lnf, BT * C}, {&a->lnf_mean, fwd * BT}, {&a->lnf_rstd, fwd * BT},
        {&a->logits, fwd * BT * Vp}, {&a->probs, fwd * BT * Vp}, {&a->losses, fwd * BT},
    };
    size_t total = 0, n = sizeof(t) / sizeof(t[0]);
    for (size_t i = 0; i < n; i++) total += t[i].n;
    a->memory = (float*)callocCheck(total, sizeof(float));
    a->num_floats = total;
    float* p = a->memory;
    for (size_t i = 0; i < n; i++) { *t[i].ptr = t[i].n ? p : NULL; p += t[i].n; }
}

typedef struct {
    ModelConfig config;
    size_t num_params;
    float* params;     // fp32 weights; on the CPU they are also the optimizer's master copy
    float* grads;
    float* m;          // AdamW first moment
    float* v;          // AdamW second moment
    Weights w, g;      // tensors inside params and grads
    Activations act, dact;
    int max_B, max_T;  // the activations' capacity
} GPT2;

static void gpt2_build(GPT2* m, const ModelConfig* c, int B, int T) {
    memset(m, 0, sizeof(*m));
    m->config = *c;
    m->num_params = gpt2_num_params(c);
    m->params = (float*)callocCheck(m->num_params, sizeof(float));
    m->grads = (float*)callocCheck(m->num_params, sizeof(float));
    m->m = (float*)callocCheck(m->num_params, sizeof(float));
    m->v = (float*)callocCheck(m->num_params, sizeof(float));
    gpt2_point_weights(&m->w, m->params, c);
    gpt2_point_weights(&m->g, m->grads, c);
    activations_alloc(&m->act, c, B, T, 0);
    activations_alloc(&m->dact, c, B, T, 1);
    m->max_B = B;
    m->max_T = T;
}

static void gpt2_free(GPT2* m) {
    free(m->params); free(m->grads); free(m->m); free(m->v);
    free(m->w.layer); free(m->g.layer);
    free(m->act.memory); free(m->dact.memory);
}

// GPT-2 initialisation: normal(0, 0.02), residual projections scaled by 1/sqrt(2 * layers),
// biases 0, LayerNorm weights 1; embedding padding rows 0. One RNG stream in layout order.
static void gpt2_init_weights(GPT2* m, uint64_t seed) {
    const ModelConfig* c = &m->config;
    Rng rng;
    rng_seed(&rng, seed);
    size_t C = c->channels;
    memset(m->params, 0, m->num_params * sizeof(float));
    rng_normal_fill(&rng, m->w.wte, (size_t)c->vocab_size * C, 0.02f);
    rng_normal_fill(&rng, m->w.wpe, (size_t)c->max_seq_len * C, 0.02f);
    float residual_std = 0.02f / sqrtf(2.0f * c->num_layers);
    for (int l = 0; l < c->num_layers; l++) {
        LayerWeights* lw = &m->w.layer[l];
        for (size_t i = 0; i < C; i++) { lw->ln1w[i] = 1.0f; lw->ln2w[i] = 1.0f; }
        rng_normal_fill(&rng, lw->qkvw, 3 * C * C, 0.02f);
        rng_normal_fill(&rng, lw->attprojw, C * C, residual_std);
        rng_normal_fill(&rng, lw->fcw, (size_t)c->ffn_hidden * C, 0.02f);
        rng_normal_fill(&rng, lw->fcprojw, C * c->ffn_hidden, residual_std);
    }
    for (size_t i = 0; i < C; i++) m->w.lnfw[i] = 1.0f;
}

// Runs the model on inputs (B,T); with targets, returns the mean loss. B, T <= capacity.
static float gpt2_forward(GPT2* m, const int* inputs, const int* targets, int B, int T) {
    const ModelConfig* c = &m->config;
    if (B > m->max_B || T > m->max_T || T > c->max_seq_len) fatal("forward: batch (%d, %d) exceeds capacity (%d, %d)", B, T, m->max_B, m->max_T);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= c->vocab_size) fatal("input token %d at position %d is outside the vocabulary (%d)", inputs[i], i, c->vocab_size);
        if (targets && (targets[i] < 0 || targets[i] >= c->vocab_size)) fatal("target token %d at position %d is outside the vocabulary (%d)", targets[i], i, c->vocab_size);
    }
    int L = c->num_layers, C = c->channels, F = c->ffn_hidden, NH = c->num_heads, V = c->vocab_size, Vp = c->padded_vocab_size;
    size_t BT = (size_t)B * T, cap = (size_t)m->max_B * m->max_T; // per-layer strides use the capacity
    Activations* a = &m->act;
    encoder_forward(a->encoded, inputs, m->w.wte, m->w.wpe, B, T, C);
    for (int l = 0; l < L; l++) {
        const LayerWeights* w = &m->w.layer[l];
        const float* residual = l == 0 ? a->encoded : a->residual3 + (l - 1) * cap * C;
        float* ln1 = a->ln1 + l * cap * C;
        float* qkv = a->qkv + l * cap * 3 * C;
        float* atty = a->atty + l * cap * C;
        float* att = a->att + l * (size_t)m->max_B * NH * m->max_T * m->max_T;
        float* attproj = a->attproj + l * cap * C;
        float* residual2 = a->residual2 + l * cap * C;
        float* ln2 = a->ln2 + l * cap * C;
        float* fch = a->fch + l * cap * F;
        float* fch_gelu = a->fch_gelu + l * cap * F;
        float* fcproj = a->fcproj + l * cap * C;
        float* residual3 = a->residual3 + l * cap * C;
        layernorm_forward(ln1, a->ln1_mean + l * cap, a->ln1_rstd + l * cap, residual, w->ln1w, w->ln1b, BT, C);
        matmul_forward(qkv, ln1, w->qkvw, w->qkvb, BT, C, 3 * C);
        attention_forward(atty, att, qkv, B, T, C, NH);
        matmul_forward(attproj, atty, w->attprojw, w->attprojb, BT, C, C);
        residual_forward(residual2, residual, attproj, BT * C);
        layernorm_forward(ln2, a->ln2_mean + l * cap, a->ln2_rstd + l * cap, residual2, w->ln2w, w->ln2b, BT, C);
        matmul_forward(fch, ln2, w->fcw, w->fcb, BT, C, F);
        gelu_forward(fch_gelu, fch, BT * F);
        matmul_forward(fcproj, fch_gelu, w->fcprojw, w->fcprojb, BT, F, C);
        residual_forward(residual3, residual2, fcproj, BT * C);
    }
    const float* last = a->residual3 + (L - 1) * cap * C;
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, last, m->w.lnfw, m->w.lnfb, BT, C);
    matmul_forward(a->logits, a->lnf, m->w.wte, NULL, BT, C, Vp); // tied output layer
    softmax_crossentropy_forward(a->probs, a->losses, a->logits, targets, BT, V, Vp);
    if (!targets) return 0.0f;
    double sum = 0.0;
    for (size_t i = 0; i < BT; i++) sum += a->losses[i];
    return (float)(sum / BT);
}

// Accumulates into m->grads the gradient of dloss_scale * (mean loss of the last forward).
static void gpt2_backward(GPT2* m, const int* inputs, const int* targets, int B, int T, float dloss_scale) {
    const ModelConfig* c = &m->config;
    int L = c->num_layers, C = c->channels, F = c->ffn_hidden, NH = c->num_heads, Vp = c->padded_vocab_size;
    size_t BT = (size_t)B * T, cap = (size_t)m->max_B * m->max_T;
    Activations *a = &m->act, *d = &m->dact;
    // gradients of activations are accumulated with +=, so start each backward from zero
    memset(d->memory, 0, d->num_floats * sizeof(float));
    softmax_crossentropy_backward(a->probs, targets, dloss_scale / (float)BT, BT, Vp);
    matmul_backward(d->lnf, m->g.wte, NULL, a->probs, a->lnf, m->w.wte, BT, C, Vp);
    float* dlast = d->residual3 + (L - 1) * cap * C;
    const float* last = a->residual3 + (L - 1) * cap * C;
    layernorm_backward(dlast, m->g.lnfw, m->g.lnfb, d->lnf, last, m->w.lnfw, a->lnf_mean, a->lnf_rstd, BT, C);
    for (int l = L - 1; l >= 0; l--) {
        const LayerWeights* w = &m->w.layer[l];
        LayerWeights* g = &m->g.layer[l];
        const float* residual = l == 0 ? a->encoded : a->residual3 + (l - 1) * cap * C;
        float* dresidual = l == 0 ? d->encoded : d->residual3 + (l - 1) * cap * C;
        size_t o1 = l * cap, oC = l * cap * C, oF = l * cap * F;
        size_t oatt = l * (size_t)m->max_B * NH * m->max_T * m->max_T;
        float* dresidual3 = d->residual3 + oC;
        // residual3 = residual2 + fcproj
        residual_backward(d->residual2 + oC, d->fcproj + oC, dresidual3, BT * C);
        matmul_backward(d->fch_gelu + oF, g->fcprojw, g->fcprojb, d->fcproj + oC, a->fch_gelu + oF, w->fcprojw, BT, F, C);
        gelu_backward(d->fch + oF, a->fch + oF, d->fch_gelu + oF, BT * F);
        matmul_backward(d->ln2 + oC, g->fcw, g->fcb, d->fch + oF, a->ln2 + oC, w->fcw, BT, C, F);
        layernorm_backward(d->residual2 + oC, g->ln2w, g->ln2b, d->ln2 + oC, a->residual2 + oC, w->ln2w, a->ln2_mean + o1, a->ln2_rstd + o1, BT, C);
        // residual2 = residual + attproj
        residual_backward(dresidual, d->attproj + oC, d->residual2 + oC, BT * C);
        matmul_backward(d->atty + oC, g->attprojw, g->attprojb, d->attproj + oC, a->atty + oC, w->attprojw, BT, C, C);
        attention_backward(d->qkv + l * cap * 3 * C, d->att + oatt, d->atty + oC, a->qkv + l * cap * 3 * C, a->att + oatt, B, T, C, NH);
        matmul_backward(d->ln1 + oC, g->qkvw, g->qkvb, d->qkv + l * cap * 3 * C, a->ln1 + oC, w->qkvw, BT, C, 3 * C);
        layernorm_backward(dresidual, g->ln1w, g->ln1b, d->ln1 + oC, residual, w->ln1w, a->ln1_mean + o1, a->ln1_rstd + o1, BT, C);
    }
    encoder_backward(m->g.wte, m->g.wpe, d->encoded, inputs, B, T, C);
}

// ----------------------------------------------------------------------------
// optimizer

// Statistics the step logic needs: any inf/nan in the gradients, and their sum of squares.
static void grad_stats(const float* g, size_t n, int* nonfinite, double* sumsq) {
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

// AdamW with DeepSpeed's semantics (DEEPSPEED.md section 4, step 5) over n parameters.
// The gradients are multiplied by p->grad_factor first: unscale and clip in one factor.
static void adamw_update(float* params, float* m, float* v, const float* grads, size_t n, const StepPlan* p, const DSConfig* c) {
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

// ----------------------------------------------------------------------------
// training

typedef struct {
    Options opt;
    DSConfig cfg;
    GPT2 model;
    DataLoader train, val;
    int has_val;
    TrainState state;
    Rng rng;            // sampling
    Logger log;
    int B, T, ga;
    double forward_ms, backward_ms, step_ms; // this step's phases, for wall_clock_breakdown
} Trainer;

static double ms_since(double t0) { return (wall_seconds() - t0) * 1e3; }

// DeepSpeed's step once the step's gradients are complete: overflow check, global norm,
// one combined unscale-and-clip factor, AdamW, schedule and loss-scaler update.
static StepPlan optimizer_step(GPT2* m, TrainState* st, const DSConfig* c) {
    int nonfinite;
    double sumsq;
    grad_stats(m->grads, m->num_params, &nonfinite, &sumsq);
    StepPlan plan = step_plan(st, c, nonfinite, sumsq);
    if (!plan.skip) adamw_update(m->params, m->m, m->v, m->grads, m->num_params, &plan, c);
    if (step_finish(st, &plan, 1)) {
        fatal("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run. (fp16 overflows at the minimum scale %g: "
              "this often happens when fine-tuning a model trained in bf16; try bf16, or a lower learning rate)", st->scaler.min_scale);
    }
    return plan;
}

// One optimizer step: ga micro batches forward and backward, then the optimizer step.
// Returns the mean loss of the micro batches.
static float train_step(Trainer* tr, StepPlan* plan) {
    GPT2* m = &tr->model;
    double data_wait = 0.0, loss_sum = 0.0, t0;
    tr->forward_ms = tr->backward_ms = 0.0;
    memset(m->grads, 0, m->num_params * sizeof(float));
    float loss_scale = (float)tr->state.scaler.scale;
    for (int micro = 0; micro < tr->ga; micro++) {
        dataloader_next(&tr->train);
        data_wait += tr->train.last_wait;
        t0 = wall_seconds();
        loss_sum += gpt2_forward(m, tr->train.inputs, tr->train.targets, tr->B, tr->T);
        tr->forward_ms += ms_since(t0);
        t0 = wall_seconds();
        // DeepSpeed backpropagates loss * scale / ga: the gradient of the step's mean loss, scaled
        gpt2_backward(m, tr->train.inputs, tr->train.targets, tr->B, tr->T, loss_scale / tr->ga);
        tr->backward_ms += ms_since(t0);
    }
    t0 = wall_seconds();
    *plan = optimizer_step(m, &tr->state, &tr->cfg);
    tr->step_ms = ms_since(t0);
    tr->train.last_wait = data_wait;
    return (float)(loss_sum / tr->ga);
}

// Mean loss over the validation batches (all of the split with --val-batches 0).
static float evaluate(Trainer* tr) {
    DataLoader* v = &tr->val;
    int64_t available = (int64_t)(v->seqs_per_epoch / ((size_t)v->world * v->B));
    int64_t batches = tr->opt.val_batches > 0 && tr->opt.val_batches < available ? tr->opt.val_batches : available;
    dataloader_seek(v, 0, 0);
    double sum = 0.0;
    for (int64_t i = 0; i < batches; i++) {
        dataloader_next(v);
        sum += gpt2_forward(&tr->model, v->inputs, v->targets, v->B, v->T);
    }
    return (float)(sum / batches);
}

// Samples text from the model, starting from the end-of-text token.
static void sample_text(Trainer* tr, const Tokenizer* tok) {
    GPT2* m = &tr->model;
    int n = (int)tr->opt.sample_tokens, T = tr->T, V = m->config.vocab_size, Vp = m->config.padded_vocab_size;
    int* seq = (int*)mallocCheck(((size_t)n + 1) * sizeof(int));
    seq[0] = tok->eot_token;
    printf("sample (%d tokens, temperature 1):\n---\n", n);
    for (int i = 1; i <= n; i++) {
        int start = i > T ? i - T : 0, len = i - start; // the last T tokens of context
        gpt2_forward(m, seq + start, NULL, 1, len);
        const float* probs = m->act.probs + (size_t)(len - 1) * Vp;
        float r = rng_uniform(&tr->rng), cdf = 0.0f;
        int next = V - 1;
        for (int k = 0; k < V; k++) { cdf += probs[k]; if (r < cdf) { next = k; break; } }
        seq[i] = next;
        print_token_safely(stdout, tokenizer_decode(tok, next));
        fflush(stdout);
    }
    printf("\n---\n");
    free(seq);
}

static CheckpointState checkpoint_state(const Trainer* tr) {
    CheckpointState s;
    memset(&s, 0, sizeof s);
    s.train = tr->state;
    s.loader_epoch = tr->train.epoch;
    s.loader_cursor = (int64_t)tr->train.cursor;
    s.seq_len = tr->T;
    s.train_seqs = (int64_t)tr->train.num_seqs;
    s.global_batch = (int64_t)tr->train.global_batch;
    s.world_size = 1;
    s.seed = tr->opt.seed;
    s.rng = tr->rng;
    return s;
}

static void save_checkpoint(Trainer* tr) {
    const char* dir = tr->opt.checkpoint_dir;
    GPT2* m = &tr->model;
    double t0 = wall_seconds();
    char tmp[PATH_LEN];
    checkpoint_begin(dir, tr->state.step, tmp, sizeof tmp);
    char path[PATH_LEN];
    format_path(path, sizeof path, "%s/model.bin", tmp);
    model_file_write(path, &m->config, m->params, m->num_params);
    optim_file_write(tmp, 0, 1, 0, m->num_params, m->num_params, m->params, m->m, m->v);
    CheckpointState s = checkpoint_state(tr);
    format_path(path, sizeof path, "%s/state.bin", tmp);
    state_file_write(path, &s);
    checkpoint_commit(dir, tr->state.step, tmp);
    printf("saved checkpoint %s/step_%08lld (%.1f MB, %.0f ms)\n", dir, (long long)tr->state.step, m->num_params * 16.0 / 1e6, ms_since(t0));
}

// Restores weights, optimizer moments, counters, loss scaler, data position and RNG.
static void load_checkpoint(Trainer* tr, const char* folder, const CheckpointState* s) {
    GPT2* m = &tr->model;
    char err[1024];
    if (optim_files_read(folder, (int)s->world_size, 0, m->num_params, m->num_params, m->params, m->m, m->v, err, sizeof err)) fatal("%s", err);
    if (s->seq_len != tr->T) fatal("checkpoint '%s' was trained with sequence length %lld, this run uses %d", folder, (long long)s->seq_len, tr->T);
    if (s->train_seqs != (int64_t)tr->train.num_seqs) {
        fatal("checkpoint '%s' was trained on data of %lld sequences, --train-data '%s' has %zu: resuming would not continue the same run",
              folder, (long long)s->train_seqs, tr->opt.train_data, tr->train.num_seqs);
    }
    if (s->seed != tr->opt.seed) printf("note: resuming with the checkpoint's seed %llu (not --seed %llu)\n", (unsigned long long)s->seed, (unsigned long long)tr->opt.seed);
    tr->opt.seed = s->seed;
    tr->train.seed = s->seed;
    LossScaler configured = tr->state.scaler; // configuration from this run's config
    tr->state = s->train;
    tr->state.scaler.enabled = configured.enabled; tr->state.scaler.dynamic = configured.dynamic;
    tr->state.scaler.min_scale = configured.min_scale; tr->state.scaler.window = configured.window;
    tr->state.scaler.hysteresis = configured.hysteresis; tr->state.scaler.consecutive_hysteresis = configured.consecutive_hysteresis;
    if (!configured.dynamic) tr->state.scaler.scale = configured.scale;
    tr->rng = s->rng;
    size_t cursor = (size_t)s->loader_cursor;
    int64_t epoch = s->loader_epoch;
    if (cursor >= tr->train.seqs_per_epoch) { epoch++; cursor = 0; }
    dataloader_seek(&tr->train, epoch, cursor);
    printf("resumed from %s: step %lld, %lld optimizer updates, %lld skipped, data epoch %lld position %zu\n", folder,
           (long long)tr->state.step, (long long)tr->state.adam_t, (long long)tr->state.skipped, (long long)epoch, cursor);
}

// Several ranks (mpirun, torchrun, Slurm) are not supported by this build yet: refuse
// rather than have every rank train the same model alone.
static void refuse_multiple_ranks(void) {
    const char* vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE", "SLURM_NTASKS"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        const char* v = getenv(vars[i]);
        if (v && atoi(v) > 1) fatal("%s=%s: this trainer runs on a single rank for now (multi-rank ZeRO is not implemented yet)", vars[i], v);
    }
}

// Says plainly which configured features this run does without.
static void print_limitations(const DSConfig* c) {
    if (c->zero_stage > 0) printf("note: zero_optimization.stage %lld with 1 rank: the one partition holds every parameter (same result as stage 0)\n", (long long)c->zero_stage);
    if (c->bf16_enabled) printf("note: bf16.enabled: the CPU trainer computes in fp32 (bf16 is a GPU trainer precision)\n");
    if (c->fp16_enabled) printf("note: fp16.enabled: the CPU trainer computes in fp32 and applies DeepSpeed's loss scaling to the fp32 gradients\n");
}

#ifndef TESTING
int main(int argc, char** argv) {
    Trainer tr;
    memset(&tr, 0, sizeof tr);
    parse_args(&tr.opt, argc, argv);
    refuse_multiple_ranks();
    load_effective_config(&tr.cfg, &tr.opt, 1);
#ifdef _OPENMP
    int threads = omp_get_max_threads();
#else
    int threads = 1;
#endif
    printf("dstrain CPU trainer (fp32, %d OpenMP threads)\n", threads);
    print_config(&tr.cfg, 1);
    print_limitations(&tr.cfg);
    char err[1024];

    // model configuration: from the checkpoint being resumed, a model file, or the flags
    char resume_folder[PATH_LEN] = {0};
    CheckpointState resume_state;
    memset(&resume_state, 0, sizeof resume_state);
    ModelConfig mc = gpt2_config(tr.opt.layers, tr.opt.heads, tr.opt.dim, tr.opt.seq_len, 50257);
    const char* weights_from = NULL;
    size_t file_params;
    if (tr.opt.resume) {
        if (tr.opt.checkpoint_dir[0] == '\0') fatal("--resume needs --checkpoint-dir");
        if (checkpoint_latest(tr.opt.checkpoint_dir, resume_folder, sizeof resume_folder, err, sizeof err)) fatal("%s", err);
        char path[PATH_LEN];
        format_path(path, sizeof path, "%s/state.bin", resume_folder);
        if (state_file_read(path, &resume_state, err, sizeof err)) fatal("%s", err);
        format_path(path, sizeof path, "%s/model.bin", resume_folder);
        if (model_file_config(path, &mc, &file_params, err, sizeof err)) fatal("%s", err);
    } else if (tr.opt.init_from) {
        weights_from = tr.opt.init_from;
        if (model_file_config(weights_from, &mc, &file_params, err, sizeof err)) fatal("%s", err);
    }
    if (model_config_check(&mc, err, sizeof err)) fatal("model: %s", err);
    tr.B = (int)tr.cfg.micro_batch;
    tr.T = mc.max_seq_len;
    tr.ga = (int)tr.cfg.grad_accum;
    gpt2_build(&tr.model, &mc, tr.B, tr.T);
    printf("model: GPT-2, %d layers, %d heads, %d channels, sequence length %d, vocabulary %d (padded %d): %.2fM parameters\n",
           mc.num_layers, mc.num_heads, mc.channels, mc.max_seq_len, mc.vocab_size, mc.padded_vocab_size, tr.model.num_params / 1e6);
    printf("memory: parameters, gradients, Adam m and v %.1f MB each; activations %.1f MB\n", tr.model.num_params * 4 / 1e6,
           (tr.model.act.num_floats + tr.model.dact.num_floats) * 4 / 1e6);

    // data
    if (dataloader_init(&tr.train, tr.opt.train_data, tr.B, tr.T, 0, 1, (size_t)tr.cfg.train_batch_size, 1, tr.opt.seed, mc.vocab_size, err, sizeof err)) fatal("%s", err);
    printf("train data: %s: %d shard(s), %zu tokens, %zu sequences of %d; %zu steps per epoch\n", tr.opt.train_data, tr.train.num_shards,
           dataloader_num_tokens(&tr.train), tr.train.num_seqs, tr.T, tr.train.seqs_per_epoch / (size_t)tr.cfg.train_batch_size);
    tr.has_val = tr.opt.val_data[0] != '\0';
    if (tr.has_val) {
        if (dataloader_init(&tr.val, tr.opt.val_data, tr.B, tr.T, 0, 1, (size_t)tr.B, 0, 0, mc.vocab_size, err, sizeof err)) fatal("%s", err);
        printf("val data: %s: %zu tokens\n", tr.opt.val_data, dataloader_num_tokens(&tr.val));
    }

    // weights and state
    train_state_init(&tr.state, &tr.cfg);
    rng_seed(&tr.rng, tr.opt.seed + 1);
    if (tr.opt.resume) {
        load_checkpoint(&tr, resume_folder, &resume_state);
    } else if (weights_from) {
        if (model_file_read(weights_from, tr.model.params, tr.model.num_params, err, sizeof err)) fatal("%s", err);
        printf("weights: from %s\n", weights_from);
    } else {
        gpt2_init_weights(&tr.model, tr.opt.seed);
        printf("weights: GPT-2 initialisation, seed %llu\n", (unsigned long long)tr.opt.seed);
    }
    logger_open(&tr.log, tr.opt.log_path, tr.opt.resume, tr.state.step);

    int64_t tokens_per_step = tr.cfg.train_batch_size * tr.T;
    printf("training: steps %lld to %lld, %lld tokens per step\n", (long long)tr.state.step + 1, (long long)tr.opt.steps, (long long)tokens_per_step);
    while (tr.state.step < tr.opt.steps) {
        double t0 = wall_seconds();
        StepPlan plan;
        float loss = train_step(&tr, &plan);
        double ms = ms_since(t0);
        StepLog sl = {tr.state.step, tr.opt.steps, loss, plan.skip ? 0.0 : plan.lr, plan.grad_norm, ms, tokens_per_step / (ms / 1e3),
                      tr.train.last_wait * 1e3, tr.cfg.fp16_enabled, plan.scale, tr.state.skipped, plan.overflow};
        log_step(&tr.log, &sl);
        if (tr.cfg.wall_clock_breakdown) {
            printf("time (ms) | forward: %.2f | backward: %.2f | backward_inner: %.2f | backward_allreduce: 0.00 | step: %.2f\n",
                   tr.forward_ms, tr.backward_ms, tr.backward_ms, tr.step_ms);
        }
        if (tr.cfg.steps_per_print && tr.state.step % tr.cfg.steps_per_print == 0) {
            printf("step=%lld, skipped=%lld, lr=[%g], mom=[(%g, %g)]\n", (long long)tr.state.step, (long long)tr.state.skipped,
                   lr_at(&tr.cfg, tr.state.sched_it), tr.cfg.betas[0], tr.cfg.betas[1]);
        }
        int last = tr.state.step == tr.opt.steps;
        if (tr.has_val && (last || (tr.opt.val_every && tr.state.step % tr.opt.val_every == 0))) {
            log_val(&tr.log, tr.state.step, evaluate(&tr), (int)(tr.opt.val_batches ? tr.opt.val_batches : 0));
        }
        if (tr.opt.checkpoint_dir[0] && (last || (tr.opt.save_every && tr.state.step % tr.opt.save_every == 0))) save_checkpoint(&tr);
    }
    if (tr.opt.sample_tokens > 0) {
        Tokenizer tok;
        if (tokenizer_load(&tok, tr.opt.tokenizer_path, err, sizeof err)) {
            printf("no sample: %s\n", err);
        } else {
            sample_text(&tr, &tok);
            tokenizer_free(&tok);
        }
    }
    logger_close(&tr.log);
    dataloader_free(&tr.train);
    if (tr.has_val) dataloader_free(&tr.val);
    gpt2_free(&tr.model);
    return 0;
}
#endif
