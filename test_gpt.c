/*
test_gpt.c: the CPU trainer against the independent PyTorch reference written by
dev/reference.py (GPT-2, 2 layers, 4 heads, 64 channels, T = 64, GPT-2's vocabulary).

    /usr/bin/python3 dev/reference.py && make test_gpt && ./test_gpt dev/data/gpt2_reference.bin

Error measure, per tensor: max |ours - torch| / max |torch| (relative to the tensor's
scale, so elements that happen to be near zero do not dominate).
Tolerances (fp32 on both sides, same math, different summation order):
  - logits and loss: 1e-5. Each logit is a sum of 64 products after two layers; fp32
    rounding differences of a few ulps (1e-7 relative) per operation accumulate to about
    1e-6, an order of magnitude under the bound.
  - every gradient tensor: 1e-4. Gradients pass through the softmax of 50257 classes,
    the attention softmax and LayerNorm backward, each of which cancels large terms;
    observed errors are about 1e-6..1e-5.
  - each of the 10 step losses: 1e-5, as for the loss; the AdamW update is elementwise and
    the clipping factor agrees to fp32 rounding.
  - final weights after 10 steps: 1e-4 of the tensor's scale. Adam's m / sqrt(v) amplifies
    tiny gradient differences for parameters whose gradient is near zero; 10 steps of lr
    <= 1e-3 bound the resulting weight difference far below this.
*/
#define TESTING
#include "train_gpt.c"
#include "tests/test.h"

typedef struct {
    int V, Vp, maxT, L, H, C, B, T, ga, steps, num_params, warmup_steps, warmup_type;
    float lr, beta1, beta2, eps, weight_decay, grad_clip, warmup_min_lr, warmup_max_lr;
    float* params;
    int* inputs;   // (ga, B, T)
    int* targets;  // (ga, B, T)
    float* logits; // (B, T, V)
    float loss;
    float* grads;
    float *losses[2], *norms[2], *lrs[2], *final[2]; // run A (AdamW) and run B (adam_w_mode false)
} Reference;

static void* read_block(FILE* f, size_t bytes, const char* path) {
    void* p = mallocCheck(bytes);
    fread_check(p, 1, bytes, f, path);
    return p;
}

static void reference_load(Reference* r, const char* path) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) fatal("reference file '%s': %s (generate it with /usr/bin/python3 dev/reference.py)", path, strerror(errno));
    int32_t h[256];
    float hp[16];
    fread_check(h, sizeof h, 1, f, path);
    fread_check(hp, sizeof hp, 1, f, path);
    if (h[0] != 20261127 || h[1] != 1) fatal("reference file '%s': bad magic or version", path);
    r->V = h[2]; r->Vp = h[3]; r->maxT = h[4]; r->L = h[5]; r->H = h[6]; r->C = h[7]; r->B = h[8]; r->T = h[9];
    r->ga = h[10]; r->steps = h[11]; r->num_params = h[12]; r->warmup_steps = h[13]; r->warmup_type = h[14];
    r->lr = hp[0]; r->beta1 = hp[1]; r->beta2 = hp[2]; r->eps = hp[3]; r->weight_decay = hp[4]; r->grad_clip = hp[5];
    r->warmup_min_lr = hp[6]; r->warmup_max_lr = hp[7];
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
}

static Reference ref;

static ModelConfig reference_model_config(void) {
    ModelConfig c = gpt2_config(ref.L, ref.H, ref.C, ref.maxT, ref.V);
    return c;
}

// the DeepSpeed config the reference trained with
static DSConfig reference_ds_config(int adam_w_mode) {
    DSConfig c;
    ds_config_defaults(&c);
    c.lr = ref.lr; c.betas[0] = ref.beta1; c.betas[1] = ref.beta2; c.eps = ref.eps;
    c.weight_decay = ref.weight_decay; c.adam_w_mode = adam_w_mode; c.gradient_clipping = ref.grad_clip;
    c.scheduler = SCHED_WARMUP_LR; c.warmup_min_lr = ref.warmup_min_lr; c.warmup_max_lr = ref.warmup_max_lr;
    c.warmup_num_steps = ref.warmup_steps; c.warmup_type = ref.warmup_type == 0 ? WARMUP_LOG : WARMUP_LINEAR;
    c.micro_batch = ref.B; c.grad_accum = ref.ga; c.train_batch_size = (int64_t)ref.B * ref.ga;
    return c;
}

// max |a - b| / max |b| over n elements with strides (so logits can skip padding columns)
static double tensor_rel_err(const float* a, const float* b, size_t rows, size_t cols, size_t a_stride, size_t b_stride) {
    double max_diff = 0.0, max_ref = 0.0;
    for (size_t r = 0; r < rows; r++) {
        for (size_t i = 0; i < cols; i++) {
            double d = fabs((double)a[r * a_stride + i] - b[r * b_stride + i]), m = fabs((double)b[r * b_stride + i]);
            if (d > max_diff) max_diff = d;
            if (m > max_ref) max_ref = m;
        }
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

static GPT2 model;

static void test_layout_matches_reference(void) {
    CHECK(model.num_params == (size_t)ref.num_params, "parameter count %zu vs reference %d", model.num_params, ref.num_params);
}

static void test_forward_logits_and_loss(void) {
    memcpy(model.params, ref.params, model.num_params * sizeof(float));
    float loss = gpt2_forward(&model, ref.inputs, ref.targets, ref.B, ref.T);
    double e_logits = tensor_rel_err(model.act.logits, ref.logits, (size_t)ref.B * ref.T, ref.V, ref.Vp, ref.V);
    double e_loss = rel_err(loss, ref.loss, 0);
    printf("    logits rel err %.2e, loss %.7f vs %.7f (rel err %.2e)\n", e_logits, loss, ref.loss, e_loss);
    CHECK(e_logits <= 1e-5, "logits rel err %.3e > 1e-5", e_logits);
    CHECK(e_loss <= 1e-5, "loss rel err %.3e > 1e-5", e_loss);
}

static void test_backward_every_gradient_tensor(void) {
    memcpy(model.params, ref.params, model.num_params * sizeof(float));
    memset(model.grads, 0, model.num_params * sizeof(float));
    gpt2_forward(&model, ref.inputs, ref.targets, ref.B, ref.T);
    gpt2_backward(&model, ref.inputs, ref.targets, ref.B, ref.T, 1.0f);
    ParamTensor* t = (ParamTensor*)mallocCheck(gpt2_num_tensors(&model.config) * sizeof(ParamTensor));
    int n = gpt2_param_tensors(&model.config, t);
    double worst = 0.0;
    const char* worst_name = "";
    for (int i = 0; i < n; i++) {
        double e = tensor_rel_err(model.grads + t[i].offset, ref.grads + t[i].offset, 1, t[i].size, 0, 0);
        CHECK(e <= 1e-4, "gradient of %s: rel err %.3e > 1e-4", t[i].name, e);
        if (e > worst) { worst = e; worst_name = t[i].name; }
    }
    printf("    %d gradient tensors, worst rel err %.2e (%s)\n", n, worst, worst_name);
    free(t);
}

// Ten optimizer steps on the reference's micro batches, as train_step does them.
static void train_reference_run(int adam_w_mode, float* losses, float* norms, float* lrs) {
    DSConfig cfg = reference_ds_config(adam_w_mode);
    TrainState st;
    train_state_init(&st, &cfg);
    memcpy(model.params, ref.params, model.num_params * sizeof(float));
    memset(model.m, 0, model.num_params * sizeof(float));
    memset(model.v, 0, model.num_params * sizeof(float));
    size_t bt = (size_t)ref.B * ref.T;
    for (int step = 0; step < ref.steps; step++) {
        memset(model.grads, 0, model.num_params * sizeof(float));
        double loss_sum = 0.0;
        for (int micro = 0; micro < ref.ga; micro++) {
            loss_sum += gpt2_forward(&model, ref.inputs + micro * bt, ref.targets + micro * bt, ref.B, ref.T);
            gpt2_backward(&model, ref.inputs + micro * bt, ref.targets + micro * bt, ref.B, ref.T, 1.0f / ref.ga);
        }
        StepPlan plan = optimizer_step(&CPU_OPS, &model, &st, &cfg);
        losses[step] = (float)(loss_sum / ref.ga);
        norms[step] = (float)plan.grad_norm;
        lrs[step] = plan.lr;
    }
}

static void check_training_run(int run) {
    float losses[64], norms[64], lrs[64];
    train_reference_run(run == 0, losses, norms, lrs);
    for (int s = 0; s < ref.steps; s++) {
        double e = rel_err(losses[s], ref.losses[run][s], 0);
        printf("    step %d: loss %.6f vs %.6f (rel err %.1e), norm %.5f vs %.5f, lr %.3e vs %.3e\n", s, losses[s], ref.losses[run][s], e,
               norms[s], ref.norms[run][s], lrs[s], ref.lrs[run][s]);
        CHECK(e <= 1e-5, "step %d loss rel err %.3e > 1e-5", s, e);
        CHECK(rel_err(norms[s], ref.norms[run][s], 0) <= 1e-4, "step %d grad norm %.7f vs %.7f", s, norms[s], ref.norms[run][s]);
        CHECK(rel_err(lrs[s], ref.lrs[run][s], 0) <= 1e-6, "step %d lr %.7e vs %.7e", s, lrs[s], ref.lrs[run][s]);
    }
    double e = tensor_rel_err(model.params, ref.final[run], 1, model.num_params, 0, 0);
    printf("    final weights rel err %.2e\n", e);
    CHECK(e <= 1e-4, "final weights rel err %.3e > 1e-4", e);
}

static void test_ten_adamw_steps_with_clipping_and_warmup(void) { check_training_run(0); }
static void test_ten_adam_l2_steps_adam_w_mode_false(void) { check_training_run(1); }

static void test_two_runs_are_bit_identical(void) {
    float l1[64], n1[64], r1[64], l2[64], n2[64], r2[64];
    train_reference_run(1, l1, n1, r1);
    float* first = (float*)mallocCheck(model.num_params * sizeof(float));
    memcpy(first, model.params, model.num_params * sizeof(float));
    train_reference_run(1, l2, n2, r2);
    CHECK(memcmp(first, model.params, model.num_params * sizeof(float)) == 0, "weights differ between identical runs");
    CHECK(memcmp(l1, l2, ref.steps * sizeof(float)) == 0, "losses differ between identical runs");
    free(first);
}

int main(int argc, char** argv) {
    const char* path = argc > 1 ? argv[1] : "dev/data/gpt2_reference.bin";
    reference_load(&ref, path);
    ModelConfig c = reference_model_config();
    gpt2_build(&model, &c, ref.B, ref.T);
    printf("reference: %s: %d layers, %d heads, %d channels, B %d, T %d, %d micro batches, %d steps\n", path, ref.L, ref.H, ref.C, ref.B, ref.T, ref.ga, ref.steps);
    RUN(test_layout_matches_reference);
    RUN(test_forward_logits_and_loss);
    RUN(test_backward_every_gradient_tensor);
    RUN(test_ten_adamw_steps_with_clipping_and_warmup);
    RUN(test_ten_adam_l2_steps_adam_w_mode_false);
    RUN(test_two_runs_are_bit_identical);
    gpt2_free(&model);
    return test_summary();
}
