/*
test_gpt.c: the CPU trainer against an independent reference, one file per run:
  - dev/reference.py (our GPT-2 written in PyTorch): its base configuration (2 layers,
    4 heads, 64 channels, T = 64, GPT-2's vocabulary) and T 100 and 130 with head sizes 32
    to 128 and a 1000-token vocabulary;
  - dev/reference_hf.py (models built by Hugging Face transformers, saved with
    save_pretrained beside the file): LlamaForCausalLM with grouped-query attention
    (groups of 2; groups of 4 at T 100, rotary positions past 64, tied, rope_theta 5e5) and
    GPT2LMHeadModel. For these the weights are also read from the saved directory the way
    --hf-model reads it, and written back the way --hf-out writes it.
`make test` runs all of them.

    /usr/bin/python3 dev/reference.py && make test_gpt && ./test_gpt dev/data/gpt2_reference.bin
    /usr/bin/python3 dev/reference_hf.py --config llama && ./test_gpt dev/data/llama_reference.bin

Error measure, per tensor: max |ours - torch| / max |torch| (relative to the tensor's
scale, so elements that happen to be near zero do not dominate).
Tolerances (fp32 on both sides, same math, different summation order):
  - logits and loss: 1e-5. Each logit is a sum of C (64 to 256) products after two layers;
    fp32 rounding differences of a few ulps (1e-7 relative) per operation accumulate to
    about 1e-6 (sums of random-signed errors grow as the square root of their length, as
    the sums themselves do), an order of magnitude under the bound.
  - every gradient tensor: 1e-4. Gradients pass through the softmax of 50257 classes,
    the attention softmax and LayerNorm (RMSNorm) backward, each of which cancels large
    terms; observed errors are about 1e-6..1e-5. LLaMA adds the rotary angles (sin and cos
    of t * theta^(-2i/hs) in fp32 on both sides, a few ulps apart) and SwiGLU: no new
    cancellation, the same bound.
  - each of the 10 step losses: 1e-5, as for the loss; the AdamW update is elementwise and
    the clipping factor agrees to fp32 rounding.
  - final weights after 10 steps: 1e-4 of the tensor's scale. Adam's m / sqrt(v) amplifies
    tiny gradient differences for parameters whose gradient is near zero; 10 steps of lr
    <= 1e-3 bound the resulting weight difference far below this.
*/
#define TESTING
#include "train_gpt.c"
#include "tests/test.h"
#include "tests/reference.h"

// What the tests share, passed to each: the reference, and a model of its configuration
// whose weights each test sets before it uses them.
typedef struct {
    Reference ref;
    Model model;
    char tmp[PATH_LEN]; // a folder of this run's own
} Fixture;

static void test_layout_matches_reference(Fixture* f) {
    const Reference* ref = &f->ref;
    CHECK(f->model.num_params == (size_t)ref->num_params, "parameter count %zu vs reference %d", f->model.num_params, ref->num_params);
}

// The reference's Hugging Face directory (transformers' save_pretrained) read the way
// --hf-model reads it gives the reference's configuration and, bit for bit, its weights;
// written back (--hf-out) and read again, the same. The tests below then run on weights
// that came through the importer. (tests/test_hf.py loads exports in transformers.)
static void test_hugging_face_directory_in_and_out(Fixture* f) {
    const Reference* ref = &f->ref;
    char err[1024], out[PATH_LEN];
    ModelConfig want = reference_model_config(ref), got;
    CHECK(hf_config_read(ref->hf_dir, &got, err, sizeof err) == 0, "%s", err);
    want.bos_token = got.bos_token; want.eos_token = got.eos_token; // token ids: the reference file does not record them
    CHECK(memcmp(&want, &got, sizeof want) == 0, "config.json of %s is not the reference's configuration", ref->hf_dir);
    float* w = (float*)mallocCheck(ref->num_params * sizeof(float));
    CHECK(hf_weights_read(ref->hf_dir, &got, w, err, sizeof err) == 0, "%s", err);
    CHECK_BITWISE(w, ref->params, (size_t)ref->num_params, "weights read from the Hugging Face directory");
    format_path(out, sizeof out, "%s/export", f->tmp);
    CHECK(hf_write(out, &got, w, 4096, NULL, err, sizeof err) == 0, "%s", err); // 4 KB shards: an index and several files
    ModelConfig back;
    memset(w, 0, ref->num_params * sizeof(float));
    CHECK(hf_config_read(out, &back, err, sizeof err) == 0 && memcmp(&back, &got, sizeof back) == 0, "exported config.json: %s", err);
    CHECK(hf_weights_read(out, &back, w, err, sizeof err) == 0, "%s", err);
    CHECK_BITWISE(w, ref->params, (size_t)ref->num_params, "weights written back and read again");
    free(w);
}

static void test_forward_logits_and_loss(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = &f->model;
    memcpy(model->params, ref->params, model->num_params * sizeof(float));
    model_forward(model, ref->inputs, ref->targets, ref->B, ref->T);
    float loss = (float)model_take_loss(model);
    TensorErr e_logits = tensor_err_strided(model->act.logits, ref->logits, (size_t)ref->B * ref->T, ref->V, ref->Vp, ref->V);
    double e_loss = rel_err(loss, ref->loss, 0);
    printf("    logits rel err %.2e, loss %.7f vs %.7f (rel err %.2e)\n", e_logits.rel_err, loss, ref->loss, e_loss);
    CHECK_TENSOR(e_logits, 1e-5, "logits");
    CHECK(e_loss <= 1e-5, "loss rel err %.3e > 1e-5", e_loss);
}

// The driver's state for one rank with the given ZeRO stage, the model's weights set to the
// reference's; the caller frees it with zero_free(&tr->zero).
static void setup_run(Trainer* tr, Fixture* f, const DSConfig* cfg, int stage) {
    memset(tr, 0, sizeof *tr);
    tr->ops = &CPU_OPS;
    tr->model = &f->model;
    tr->mc = f->model.config;
    tr->num_params = f->model.num_params;
    tr->cfg = *cfg;
    tr->cfg.zero_stage = stage;
    comm_init_single(&tr->comm);
    size_t embedding_n, region_max;
    gradient_regions(&tr->mc, &embedding_n, &region_max);
    zero_init(&tr->zero, stage, &tr->comm, &HOST_BUFFERS, tr->num_params, embedding_n, region_max, &tr->cfg);
    train_state_init(&tr->state, &tr->cfg);
    memcpy(tr->zero.master, f->ref.params, tr->num_params * sizeof(float));
    zero_share_weights(tr);
}

static void test_backward_every_gradient_tensor(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = &f->model;
    DSConfig cfg = reference_ds_config(ref, 1);
    Trainer tr;
    setup_run(&tr, f, &cfg, 0);
    zero_begin_step(&tr.zero);
    model_forward(model, ref->inputs, ref->targets, ref->B, ref->T);
    model_take_loss(model); // test_forward_logits_and_loss checks it; the next step starts a new sum
    model_backward(model, ref->inputs, ref->B, ref->T, 1.0f, &tr.zero.sink);
    const float* grads = tr.zero.grads;
    ParamTable table = param_table(&model->config);
    const ParamTensor* t = table.tensors;
    int n = table.count;
    double worst = 0.0;
    const char* worst_name = "";
    for (int i = 0; i < n; i++) {
        TensorErr e = tensor_err(grads + t[i].offset, ref->grads + t[i].offset, t[i].size);
        CHECK_TENSOR(e, 1e-4, "gradient of %s", t[i].name);
        if (e.rel_err > worst) { worst = e.rel_err; worst_name = t[i].name; }
    }
    printf("    %d gradient tensors, worst rel err %.2e (%s)\n", n, worst, worst_name);
    param_table_free(&table);
    zero_free(&tr.zero);
}

// Optimizer steps from the reference's initial weights (see reference_train_steps).
// The model ends with the run's weights.
static TrainState run_steps(Fixture* f, const DSConfig* cfg, int stage, int steps, const int* inject, int n_inject, float* losses, float* norms,
                            float* lrs) {
    Trainer tr;
    setup_run(&tr, f, cfg, stage);
    reference_train_steps(&tr, &f->ref, steps, inject, n_inject, losses, norms, lrs);
    zero_free(&tr.zero);
    return tr.state;
}

static void train_reference_run(Fixture* f, int adam_w_mode, int stage, float* losses, float* norms, float* lrs) {
    DSConfig cfg = reference_ds_config(&f->ref, adam_w_mode);
    run_steps(f, &cfg, stage, f->ref.steps, NULL, 0, losses, norms, lrs);
}

static void check_training_run(Fixture* f, int run, int stage) {
    const Reference* ref = &f->ref;
    Model* model = &f->model;
    float losses[64], norms[64], lrs[64];
    train_reference_run(f, run == 0, stage, losses, norms, lrs);
    for (int s = 0; s < ref->steps; s++) {
        double e = rel_err(losses[s], ref->losses[run][s], 0);
        printf("    step %d: loss %.6f vs %.6f (rel err %.1e), norm %.5f vs %.5f, lr %.3e vs %.3e\n", s, losses[s], ref->losses[run][s], e,
               norms[s], ref->norms[run][s], lrs[s], ref->lrs[run][s]);
        CHECK(e <= 1e-5, "step %d loss rel err %.3e > 1e-5", s, e);
        CHECK(rel_err(norms[s], ref->norms[run][s], 0) <= 1e-4, "step %d grad norm %.7f vs %.7f", s, norms[s], ref->norms[run][s]);
        CHECK(rel_err(lrs[s], ref->lrs[run][s], 0) <= 1e-6, "step %d lr %.7e vs %.7e", s, lrs[s], ref->lrs[run][s]);
    }
    TensorErr e = tensor_err(model->params, ref->final[run], model->num_params);
    printf("    final weights rel err %.2e\n", e.rel_err);
    CHECK_TENSOR(e, 1e-4, "final weights");
}

static void test_ten_adamw_steps_with_clipping_and_warmup(Fixture* f) { check_training_run(f, 0, 0); }
static void test_ten_adam_l2_steps_adam_w_mode_false(Fixture* f) { check_training_run(f, 1, 0); }

// ZeRO stage 2 hands gradients over region by region into buckets; with buckets of 1000
// elements every region is split over many buckets and both buffers take turns.
static void test_ten_steps_through_zero_stage2_small_buckets(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = &f->model;
    DSConfig saved = reference_ds_config(ref, 1);
    saved.reduce_bucket_size = 1000;
    saved.overlap_comm = 1;
    float losses[64], norms[64], lrs[64];
    run_steps(f, &saved, 2, ref->steps, NULL, 0, losses, norms, lrs);
    for (int s = 0; s < ref->steps; s++) CHECK(rel_err(losses[s], ref->losses[0][s], 0) <= 1e-5, "step %d loss %.7f vs %.7f", s, losses[s], ref->losses[0][s]);
    TensorErr e = tensor_err(model->params, ref->final[0], model->num_params);
    printf("    stage 2: final weights rel err %.2e\n", e.rel_err);
    CHECK_TENSOR(e, 1e-4, "final weights");
}

static void test_two_runs_are_bit_identical(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = &f->model;
    float l1[64], n1[64], r1[64], l2[64], n2[64], r2[64];
    train_reference_run(f, 1, 0, l1, n1, r1);
    float* first = (float*)mallocCheck(model->num_params * sizeof(float));
    memcpy(first, model->params, model->num_params * sizeof(float));
    train_reference_run(f, 1, 0, l2, n2, r2);
    CHECK_BITWISE(model->params, first, model->num_params, "weights of two identical runs");
    CHECK_BITWISE(l2, l1, ref->steps, "losses of two identical runs");
    free(first);
}

// The reference's configuration with DeepSpeed's fp16 dynamic loss scaling (2^16, hysteresis 2).
static DSConfig reference_fp16_config(const Reference* ref) {
    DSConfig c = reference_ds_config(ref, 1);
    c.fp16_enabled = 1; c.fp16_loss_scale = 0; c.fp16_initial_scale_power = 16;
    c.fp16_loss_scale_window = 1000; c.fp16_hysteresis = 2; c.fp16_min_loss_scale = 1;
    return c;
}

// Loss scaling changes nothing but the representable range: the scale is a power of two,
// so every gradient of the scaled backward is exactly S times the unscaled one, the norm
// of the scaled gradients is exactly S times the true norm, and 1 / (S * clip) applied to
// S * g is exactly g / clip. The run must therefore equal the fp32 run bit for bit (the
// issue asks for "fp32 rounding"; exact equality is the stronger statement that holds).
static void test_fp16_scaling_gives_the_fp32_update(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = &f->model;
    float l32[64], n32[64], r32[64], l16[64], n16[64], r16[64];
    DSConfig f32 = reference_ds_config(ref, 1), f16 = reference_fp16_config(ref);
    run_steps(f, &f32, 0, ref->steps, NULL, 0, l32, n32, r32);
    float* w32 = (float*)mallocCheck(model->num_params * sizeof(float));
    memcpy(w32, model->params, model->num_params * sizeof(float));
    TrainState st = run_steps(f, &f16, 0, ref->steps, NULL, 0, l16, n16, r16);
    CHECK(st.skipped == 0 && st.scaler.scale == 65536, "no overflow, scale 2^16");
    for (int s = 0; s < ref->steps; s++) CHECK(n16[s] == n32[s], "step %d: logged norm %.9g is not the unscaled norm %.9g", s, n16[s], n32[s]);
    CHECK_BITWISE(model->params, w32, model->num_params, "weights of the scaled run against the fp32 run");
    free(w32);
}

// Steps with an overflow are skipped exactly: Adam's t and the schedule do not advance, so
// 10 steps with 2 overflows end with the weights of 8 clean steps (every step of the
// reference uses the same micro batches, so leaving out a step's micro batches is leaving
// out the step).
static void test_injected_overflows_skip_exactly_those_steps(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = &f->model;
    float l[64], n[64], r[64], l8[64], n8[64], r8[64];
    int inject[2] = {3, 7};
    DSConfig f16 = reference_fp16_config(ref), f32 = reference_ds_config(ref, 1);
    TrainState st = run_steps(f, &f16, 0, ref->steps, inject, 2, l, n, r);
    CHECK(st.step == 10 && st.skipped == 2 && st.adam_t == 8 && st.sched_it == 7, "step %lld skipped %lld t %lld sched_it %lld",
          (long long)st.step, (long long)st.skipped, (long long)st.adam_t, (long long)st.sched_it);
    // first overflow only spends the hysteresis; the second halves the scale
    CHECK(st.scaler.scale == 32768 && st.scaler.hyst == 1 && st.scaler.last_overflow_iter == 7, "scaler: %g hyst %lld last %lld",
          st.scaler.scale, (long long)st.scaler.hyst, (long long)st.scaler.last_overflow_iter);
    CHECK(isnan(n[3]) && isnan(n[7]) && isfinite(n[4]), "skipped steps have no norm");
    CHECK(r[3] == r[4] && r[7] == r[8], "a skipped step leaves the schedule where it was: the next applied step uses its lr");
    float* w16 = (float*)mallocCheck(model->num_params * sizeof(float));
    memcpy(w16, model->params, model->num_params * sizeof(float));
    run_steps(f, &f32, 0, ref->steps - 2, NULL, 0, l8, n8, r8);
    int applied = 0;
    for (int s = 0; s < ref->steps; s++) {
        if (s == 3 || s == 7) continue;
        CHECK(r[s] == r8[applied] && n[s] == n8[applied], "applied step %d: lr %g vs %g, norm %g vs %g", s, r[s], r8[applied], n[s], n8[applied]);
        applied++;
    }
    CHECK_BITWISE(w16, model->params, model->num_params, "weights against the run without the skipped steps");
    free(w16);
}

int main(int argc, char** argv) {
    const char* path = argc > 1 ? argv[1] : "dev/data/gpt2_reference.bin";
    Fixture f;
    Reference* ref = &f.ref;
    reference_load(ref, path);
    ModelConfig c = reference_model_config(ref);
    model_build(&f.model, &c, ref->B, ref->T);
    printf("reference: %s: %d layers, %d heads, %d channels, B %d, T %d, %d micro batches, %d steps\n", path, ref->L, ref->H, ref->C, ref->B, ref->T,
           ref->ga, ref->steps);
    format_path(f.tmp, sizeof f.tmp, "/tmp/test_gpt.XXXXXX");
    if (mkdtemp(f.tmp) == NULL) fatal("cannot make a temporary folder: %s", strerror(errno));
    RUN_WITH(test_layout_matches_reference, &f);
    if (ref->hf_dir) RUN_WITH(test_hugging_face_directory_in_and_out, &f); // the references transformers wrote
    RUN_WITH(test_forward_logits_and_loss, &f);
    RUN_WITH(test_backward_every_gradient_tensor, &f);
    RUN_WITH(test_ten_adamw_steps_with_clipping_and_warmup, &f);
    RUN_WITH(test_ten_adam_l2_steps_adam_w_mode_false, &f);
    RUN_WITH(test_ten_steps_through_zero_stage2_small_buckets, &f);
    RUN_WITH(test_two_runs_are_bit_identical, &f);
    RUN_WITH(test_fp16_scaling_gives_the_fp32_update, &f);
    RUN_WITH(test_injected_overflows_skip_exactly_those_steps, &f);
    model_free(&f.model);
    char cmd[PATH_LEN + 16];
    format_path(cmd, sizeof cmd, "rm -rf '%s'", f.tmp);
    if (system(cmd) != 0) printf("note: could not remove %s\n", f.tmp);
    return test_summary();
}
