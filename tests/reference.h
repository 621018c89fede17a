/*
reference.h: the reference files that dev/reference.py (our PyTorch GPT-2) and
dev/reference_hf.py (Hugging Face transformers' LLaMA and GPT-2) write (the format is
documented in dev/reference.py), read by test_gpt.c and test_gpt.cu, the model
configuration they describe, and the optimizer steps both tests take on them. The error
measures are in compare.h. Include after dstrain.h.
*/
#ifndef REFERENCE_H
#define REFERENCE_H

#define REFERENCE_MAGIC 20261127
#define REFERENCE_VERSION 2 // version 1: GPT-2 with its constants (no model words past header[14])

typedef struct {
    int V, Vp, maxT, L, H, C, B, T, ga, steps, num_params, warmup_steps, warmup_type;
    float lr, beta1, beta2, eps, weight_decay, grad_clip, warmup_min_lr, warmup_max_lr;
    // the model beyond GPT-2's sizes (version 2; a version 1 file is GPT-2: H, 4 C, tied, 1e-5, 0.02)
    int arch;             // ARCH_GPT2 or ARCH_LLAMA
    int num_kv_heads, ffn_hidden, tied;
    float norm_eps, rope_theta, init_std;
    char* hf_dir;         // the Hugging Face directory of the initial weights next to the file
                          // (its path without ".bin"), or NULL if it has none
    float* params;
    int* inputs;   // (ga, B, T)
    int* targets;  // (ga, B, T)
    float* logits; // (B, T, V)
    float loss;
    float* grads;
    float *losses[2], *norms[2], *lrs[2], *final[2]; // run A (AdamW) and run B (adam_w_mode false)
} Reference;

// The model the reference describes: gpt2_config or llama_config with every field the file
// records (model_config_check judges them; reference_load refuses a file it rejects).
static ModelConfig reference_model_config(const Reference* r) {
    ModelConfig c = r->arch == ARCH_GPT2 ? gpt2_config(r->L, r->H, r->C, r->maxT, r->V)
                                         : llama_config(r->L, r->H, r->num_kv_heads, r->C, r->ffn_hidden, r->maxT, r->V);
    c.arch = r->arch; // anything else than the two is refused by model_config_check
    c.num_kv_heads = r->num_kv_heads; c.ffn_hidden = r->ffn_hidden; c.tied = r->tied;
    c.norm_eps = r->norm_eps; c.rope_theta = r->rope_theta; c.init_std = r->init_std;
    return c;
}

// what a version 1 file means: GPT-2 with its constants
static void reference_set_gpt2_constants(Reference* r) {
    r->arch = ARCH_GPT2; r->num_kv_heads = r->H; r->ffn_hidden = 4 * r->C; r->tied = 1;
    r->norm_eps = 1e-5f; r->rope_theta = 0.0f; r->init_std = 0.02f;
}

static void* read_block(FILE* f, size_t bytes, const char* path) {
    void* p = mallocCheck(bytes);
    fread_check(p, 1, bytes, f, path);
    return p;
}

// every tolerance is relative to the reference, so a NaN or inf in it would make a check
// meaningless: refuse the file instead
static void check_finite(const float* x, size_t n, const char* what, const char* path) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) fatal("reference file '%s': %s[%zu] is %g (regenerate it with dev/reference.py)", path, what, i, x[i]);
}

static void reference_check_finite(const Reference* r, const char* path) {
    size_t P = r->num_params;
    check_finite(r->params, P, "params", path);
    check_finite(r->logits, (size_t)r->B * r->T * r->V, "logits", path);
    check_finite(&r->loss, 1, "loss", path);
    check_finite(r->grads, P, "grads", path);
    for (int run = 0; run < 2; run++) {
        check_finite(r->losses[run], r->steps, "losses", path);
        check_finite(r->norms[run], r->steps, "norms", path);
        check_finite(r->lrs[run], r->steps, "lrs", path);
        check_finite(r->final[run], P, "final", path);
    }
}

static void reference_load(Reference* r, const char* path) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) fatal("reference file '%s': %s (generate it with /usr/bin/python3 dev/reference.py or dev/reference_hf.py)", path, strerror(errno));
    int32_t h[256];
    float hp[16];
    fread_check(h, sizeof h, 1, f, path);
    fread_check(hp, sizeof hp, 1, f, path);
    if (h[0] != REFERENCE_MAGIC) fatal("reference file '%s': bad magic %d, expected %d", path, h[0], REFERENCE_MAGIC);
    if (h[1] < 1 || h[1] > REFERENCE_VERSION) fatal("reference file '%s': version %d, expected 1..%d", path, h[1], REFERENCE_VERSION);
    r->V = h[2]; r->Vp = h[3]; r->maxT = h[4]; r->L = h[5]; r->H = h[6]; r->C = h[7]; r->B = h[8]; r->T = h[9];
    r->ga = h[10]; r->steps = h[11]; r->num_params = h[12]; r->warmup_steps = h[13]; r->warmup_type = h[14];
    r->lr = hp[0]; r->beta1 = hp[1]; r->beta2 = hp[2]; r->eps = hp[3]; r->weight_decay = hp[4]; r->grad_clip = hp[5];
    r->warmup_min_lr = hp[6]; r->warmup_max_lr = hp[7];
    r->hf_dir = NULL;
    if (h[1] == 1) {
        reference_set_gpt2_constants(r);
    } else {
        r->arch = h[15]; r->num_kv_heads = h[16]; r->ffn_hidden = h[17]; r->tied = h[18];
        r->norm_eps = hp[8]; r->rope_theta = hp[9]; r->init_std = hp[10];
        if (h[19]) { // the directory is the file's path without ".bin"
            size_t n = strlen(path);
            if (n < 5 || strcmp(path + n - 4, ".bin") != 0) fatal("reference file '%s': has a Hugging Face directory, but its name does not end in .bin", path);
            r->hf_dir = (char*)mallocCheck(n - 3);
            memcpy(r->hf_dir, path, n - 4);
            r->hf_dir[n - 4] = '\0';
        }
    }
    ModelConfig c = reference_model_config(r);
    char err[256];
    if (model_config_check(&c, err, sizeof err)) fatal("reference file '%s': %s", path, err);
    if (c.padded_vocab_size != r->Vp || model_num_params(&c) != (size_t)r->num_params)
        fatal("reference file '%s': padded vocab %d and %d parameters, its %s configuration has %d and %zu", path, r->Vp, r->num_params,
              arch_name(r->arch), c.padded_vocab_size, model_num_params(&c));
    if (r->B < 1 || r->T < 1 || r->T > r->maxT || r->ga < 1) fatal("reference file '%s': B %d, T %d (maxT %d), ga %d", path, r->B, r->T, r->maxT, r->ga);
    if (r->steps < 1 || r->steps > 64) fatal("reference file '%s': %d steps, expected 1..64", path, r->steps);
    size_t P = r->num_params * sizeof(float), tok = (size_t)r->ga * r->B * r->T * sizeof(int);
    r->params = (float*)read_block(f, P, path);
    r->inputs = (int*)read_block(f, tok, path);
    r->targets = (int*)read_block(f, tok, path);
    r->logits = (float*)read_block(f, (size_t)r->B * r->T * r->V * sizeof(float), path);
    fread_check(&r->loss, sizeof(float), 1, f, path);
    r->grads = (float*)read_block(f, P, path);
    for (int run = 0; run < 2; run++) {
        r->losses[run] = (float*)read_block(f, r->steps * sizeof(float), path);
        r->norms[run] = (float*)read_block(f, r->steps * sizeof(float), path);
        r->lrs[run] = (float*)read_block(f, r->steps * sizeof(float), path);
        r->final[run] = (float*)read_block(f, P, path);
    }
    if (fgetc(f) != EOF) fatal("reference file '%s': unexpected bytes at the end", path);
    fclose(f);
    reference_check_finite(r, path);
}

// writes r in the format reference_load reads (version 2, without a Hugging Face directory);
// inline: test_gpt.cu uses it, test_gpt.c does not
static inline void reference_save(const Reference* r, const char* path) {
    FILE* f = fopenCheck(path, "wb");
    int32_t h[256] = {REFERENCE_MAGIC, REFERENCE_VERSION, r->V, r->Vp, r->maxT, r->L, r->H, r->C, r->B, r->T, r->ga, r->steps, r->num_params,
                      r->warmup_steps, r->warmup_type, r->arch, r->num_kv_heads, r->ffn_hidden, r->tied, 0};
    float hp[16] = {r->lr, r->beta1, r->beta2, r->eps, r->weight_decay, r->grad_clip, r->warmup_min_lr, r->warmup_max_lr,
                    r->norm_eps, r->rope_theta, r->init_std};
    size_t P = r->num_params, tok = (size_t)r->ga * r->B * r->T;
    fwrite_check(h, sizeof h, 1, f, path);
    fwrite_check(hp, sizeof hp, 1, f, path);
    fwrite_check(r->params, sizeof(float), P, f, path);
    fwrite_check(r->inputs, sizeof(int), tok, f, path);
    fwrite_check(r->targets, sizeof(int), tok, f, path);
    fwrite_check(r->logits, sizeof(float), (size_t)r->B * r->T * r->V, f, path);
    fwrite_check(&r->loss, sizeof(float), 1, f, path);
    fwrite_check(r->grads, sizeof(float), P, f, path);
    for (int run = 0; run < 2; run++) {
        fwrite_check(r->losses[run], sizeof(float), r->steps, f, path);
        fwrite_check(r->norms[run], sizeof(float), r->steps, f, path);
        fwrite_check(r->lrs[run], sizeof(float), r->steps, f, path);
        fwrite_check(r->final[run], sizeof(float), P, f, path);
    }
    if (fclose(f) != 0) fatal("cannot write '%s': %s", path, strerror(errno));
}

// the DeepSpeed config the reference trained with
static DSConfig reference_ds_config(const Reference* r, int adam_w_mode) {
    DSConfig c;
    ds_config_defaults(&c);
    c.lr = r->lr; c.betas[0] = r->beta1; c.betas[1] = r->beta2; c.eps = r->eps;
    c.weight_decay = r->weight_decay; c.adam_w_mode = adam_w_mode; c.gradient_clipping = r->grad_clip;
    c.scheduler = SCHED_WARMUP_LR; c.warmup_min_lr = r->warmup_min_lr; c.warmup_max_lr = r->warmup_max_lr;
    c.warmup_num_steps = r->warmup_steps; c.warmup_type = r->warmup_type == 0 ? WARMUP_LOG : WARMUP_LINEAR;
    c.micro_batch = r->B; c.grad_accum = r->ga; c.train_batch_size = (int64_t)r->B * r->ga;
    return c;
}

// Optimizer steps on the reference's micro batches, as the driver's train_step does them
// (backward of loss * scale / ga into the ZeRO engine, then optimizer_step). Steps listed
// in `inject` (0-based, from now) get +inf in the first gradient of wte, as an fp16
// overflow would. Per step: the mean loss, the gradient norm and the lr.
static void reference_train_steps(Trainer* tr, const Reference* r, int steps, const int* inject, int n_inject, float* losses, float* norms, float* lrs) {
    for (int i = 0; i < n_inject; i++) { tr->faults.steps[i] = tr->state.step + inject[i] + 1; tr->faults.index[i] = 0; }
    tr->faults.count = n_inject;
    size_t bt = (size_t)r->B * r->T;
    for (int step = 0; step < steps; step++) {
        zero_begin_step(&tr->zero);
        float scale = (float)tr->state.scaler.scale;
        for (int micro = 0; micro < r->ga; micro++) {
            tr->ops->forward(tr->model, r->inputs + micro * bt, r->targets + micro * bt, r->B, r->T);
            tr->ops->backward(tr->model, r->inputs + micro * bt, r->B, r->T, scale / r->ga, &tr->zero.sink);
            zero_end_backward(&tr->zero);
        }
        StepPlan plan = optimizer_step(tr, &losses[step]);
        norms[step] = (float)plan.grad_norm;
        lrs[step] = plan.lr;
    }
}

#endif
