/*
test_gpt.cu: the GPU trainer against the independent references test_gpt.c reads, in the
precision it was built with: PyTorch's GPT-2 (dev/reference.py) and Hugging Face
transformers' models (dev/reference_hf.py: LlamaForCausalLM and GPT2LMHeadModel). The base
configuration (GPT-2, 2 layers, 4 heads, 64 channels, T = 64, GPT-2's vocabulary) is one
tile of the attention kernels; the others (T 100 and 130, head sizes 32, 64 and 128, a
1000-token vocabulary) take the online-softmax rescale, the causal mask inside a partial
tile and the backward over several tiles; the LLaMA ones add RMSNorm, rotary embeddings,
SwiGLU, an untied lm_head and grouped-query attention with groups of 2 (T 64) and of 4
(T 100, a partial tile). One file per run, one binary per precision:

    /usr/bin/python3 dev/reference.py [--config t130_hs64]
    /usr/bin/python3 dev/reference_hf.py --config llama_t100_gqa4
    make test_gpt_cu_fp32 test_gpt_cu_fp16 test_gpt_cu_bf16
    ./test_gpt_cu_bf16 dev/data/gpt2_reference.bin

Without PyTorch (a GPU machine may not have it, and the file is about 100 MB to carry):
    ./test_gpt_cu_fp32 --write-cpu-reference FILE && ./test_gpt_cu_bf16 FILE
writes a reference file in the same format whose expected values come from the CPU trainer
(train_gpt.c, which test_gpt.c holds to PyTorch within the fp32 tolerances below), for the
same configuration, with weights from dstrain.h's initialisation (LayerNorm weights and
biases randomised as dev/reference.py does) and random tokens.

Error measure, per tensor, as in test_gpt.c: max |ours - reference| / max |reference|.

Tolerances.
  FP32: those of test_gpt.c (fp32 on both sides, only the order of the sums differs):
  logits and loss 1e-5, every gradient tensor 1e-4, each step's loss 1e-5, grad norms 1e-4,
  final weights 1e-4.
  FP16 and BF16: first-order error bounds. u is the unit roundoff of the format (bf16 2^-8,
  fp16 2^-11); every rounding of a value to floatX adds at most u to its relative error, and
  to first order these errors add up along the computation, so a value computed through n
  roundings is within n u. Counting the roundings on the longest path, for L layers:
    GPT-2 forward, n_fwd = 5 + 13 L: the embeddings (the weights' rounding, then the sum); per
      layer 13: ln1; qkv weights, qkv; the attention probabilities P and output; projection
      weights, residual2; ln2; fc weights, fch; GELU; fcproj weights, residual3; then lnf,
      wte's rounding and the logits.
      logits: n_fwd u.
      loss: the loss of a row moves by at most twice the largest logit error (once through
      the log-sum-exp, once through the target's logit), so 2 (n_fwd u) max|logit| / loss.
    GPT-2 backward, n_bwd = n_fwd + 3 + 10 L: dlogits, dlnf, the residual gradient; per layer 10:
      the fcproj input gradient, GELU's, dln2, the residual gradient, datty; in attention
      P and dS, then dqkv; dln1, the residual gradient. Weight gradients are fp32.
      every gradient tensor: n_bwd u; grad norms likewise.
    LLaMA: the embedding is only the weights' rounding (no positions to add), and each
      layer has one more rounding each way: rope's rotation of q and k in forward (the norms,
      SwiGLU and lm_head take GPT-2's LayerNorm, GELU and wte places), and of dq and dk in
      backward; so n_fwd = 4 + 14 L, n_bwd = n_fwd + 3 + 11 L.
    each step's loss: the loss bound, plus the gradients' relative error n_bwd u applied to
      the decrease the updates achieved so far, |loss_0 - loss_s| (Adam's update is
      invariant to the gradient's scale, so a relative error in the gradient moves each
      update direction by about as much).
  The count depends on L only, not on T, the head size, C or the vocabulary. Over several
  key tiles the online softmax rescales the fp32 O, running max and sum by fp32 factors, and
  each P is rounded once (from the running max: a relative rounding error is unchanged by
  the later rescale); the backward recomputes each P once from the fp32 lse and rounds P and
  dS once, accumulating dQ, dK and dV over tiles in fp32. Longer sums (over T keys, hs or C
  products) add no rounding to the count: their errors, of random sign, grow as the square
  root of the sum's length, as the sum itself does, and the error is measured against the
  tensor's largest value. So the bounds hold for every reference configuration.
  Final weights are compared in FP32 only: Adam's normalised update turns the sign of a
  near-zero gradient into a whole step of lr, and the only bound for such parameters, 2 lr
  per step, is one no implementation could fail.
FP16 runs DeepSpeed's loss scaling with the static scale 2^16 (DeepSpeed's initial dynamic
scale), so that no step is skipped and every step compares with the reference.

Also: the precision/config agreement, --recompute against storing (bit-identical
gradients), two identical runs bit-identical, a save/restore round trip bit-identical, and
the global-norm and inf/nan kernel against the host.
*/
#define TESTING
#include "train_gpt.cu"
namespace cpu {
#include "train_gpt.c"
}
#include "tests/test.h"
#include "tests/reference.h"

// the DeepSpeed config the reference trained with; FP16 adds its loss scaling
static DSConfig gpu_reference_config(const Reference* ref, int adam_w_mode) {
    DSConfig c = reference_ds_config(ref, adam_w_mode);
#if defined(ENABLE_FP16)
    c.fp16_enabled = 1;
    c.fp16_loss_scale = 65536.0;
#endif
    return c;
}

// ----------------------------------------------------------------------------
// tolerances (derivation at the top)

typedef struct { double logits, loss, grad, norm, lr; } Tolerances;

static Tolerances tolerances(const Reference* ref) {
    Tolerances tol;
    tol.lr = 1e-6; // the schedule is host arithmetic, the same in every build
#if defined(ENABLE_FP32)
    (void)ref;
    tol.logits = 1e-5; tol.loss = 1e-5; tol.grad = 1e-4; tol.norm = 1e-4;
#else
    double u = strcmp(PRECISION_NAME, "fp16") == 0 ? ldexp(1.0, -11) : ldexp(1.0, -8);
    int llama = ref->arch == ARCH_LLAMA; // one rounding fewer at the embedding, one more per layer each way (rope)
    int n_fwd = 5 - llama + (13 + llama) * ref->L, n_bwd = n_fwd + 3 + (10 + llama) * ref->L;
    double max_logit = 0.0;
    for (size_t i = 0; i < (size_t)ref->B * ref->T * ref->V; i++) max_logit = fmax(max_logit, fabs(ref->logits[i]));
    tol.logits = n_fwd * u;
    tol.loss = 2.0 * tol.logits * max_logit / ref->loss;
    tol.grad = n_bwd * u;
    tol.norm = tol.grad;
    printf("tolerances (%s, u = 2^%d, %d layers): logits %d u = %.3g, loss %.3g, gradients %d u = %.3g\n", PRECISION_NAME,
           (int)log2(u), ref->L, n_fwd, tol.logits, tol.loss, n_bwd, tol.grad);
#endif
    return tol;
}

// relative tolerance of step s's loss of run `run`
static double step_loss_tolerance(const Reference* ref, const Tolerances* tol, int run, int s) {
#if defined(ENABLE_FP32)
    (void)ref; (void)run; (void)s;
    return tol->loss;
#else
    return tol->loss + tol->grad * fabs(ref->losses[run][0] - ref->losses[run][s]) / ref->losses[run][s];
#endif
}

// ----------------------------------------------------------------------------
// helpers: the driver's state for one rank (ZeRO stage 0), as in test_gpt.c, for any model
// behind ModelOps: the GPU trainer's, or the CPU trainer's for --write-cpu-reference

// What the tests share, passed to each: the reference, its tolerances, a GPU model of its
// configuration whose weights each test sets before it uses them, and host scratch.
typedef struct {
    Reference ref;
    Tolerances tol;
    Model* model;
    Options options;
    float* host_grads;  // num_params
    float* host_logits; // B*T*Vp
} Fixture;

static void download_floatX(float* dst, const floatX* src, size_t n) {
    floatX* tmp = (floatX*)mallocCheck(n * sizeof(floatX));
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaMemcpy(tmp, src, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) dst[i] = to_float(tmp[i]);
    free(tmp);
}

// A fresh driver state in *tr (freeing what it held; the caller zero_free's the last) for
// model m (behind ops) with the reference's initial weights as the fp32 master and zero
// moments; the model's weights set from the master.
static void setup_run(Trainer* tr, const Reference* ref, const ModelOps* ops, void* m, const DSConfig* cfg) {
    if (tr->zero.master) zero_free(&tr->zero);
    memset(tr, 0, sizeof *tr);
    tr->ops = ops;
    tr->model = m;
    tr->mc = reference_model_config(ref);
    tr->num_params = ops->num_params(m);
    tr->cfg = *cfg;
    comm_init_single(&tr->comm);
    size_t embedding_n, region_max;
    gradient_regions(&tr->mc, &embedding_n, &region_max);
    zero_init(&tr->zero, 0, &tr->comm, ops->buf, tr->num_params, embedding_n, region_max, &tr->cfg);
    train_state_init(&tr->state, &tr->cfg);
    ops->buf->from_host(tr->zero.master, ref->params, tr->num_params);
    zero_share_weights(tr);
}

// the gradient of micro batch 0's mean loss at the reference's weights, unscaled
// (backpropagated times `scale`, as loss scaling does), into grads (host)
static void micro_batch_gradients(Trainer* tr, const Reference* ref, const ModelOps* ops, void* m, float scale, float* grads) {
    DSConfig cfg = gpu_reference_config(ref, 1);
    setup_run(tr, ref, ops, m, &cfg);
    zero_begin_step(&tr->zero);
    ops->forward(m, ref->inputs, ref->targets, ref->B, ref->T);
    ops->take_loss(m); // test_forward_logits_and_loss checks it; the next step starts a new sum
    ops->backward(m, ref->inputs, ref->B, ref->T, scale, &tr->zero.sink);
    zero_end_backward(&tr->zero);
    ops->buf->to_host(grads, tr->zero.grads, tr->num_params);
    for (size_t i = 0; i < tr->num_params; i++) grads[i] /= scale;
}

// the GPU model's gradient; FP16 backpropagates it times 2^16, as loss scaling does
static void reference_gradients(Trainer* tr, const Reference* ref, Model* m, float* grads) {
    micro_batch_gradients(tr, ref, &GPU_OPS, m, strcmp(PRECISION_NAME, "fp16") == 0 ? 65536.0f : 1.0f, grads);
}

// the reference's ten steps from its initial weights, with the GPU model
static void train_reference_run(Trainer* tr, Fixture* f, int adam_w_mode, float* losses, float* norms, float* lrs) {
    DSConfig cfg = gpu_reference_config(&f->ref, adam_w_mode);
    setup_run(tr, &f->ref, &GPU_OPS, f->model, &cfg);
    reference_train_steps(tr, &f->ref, f->ref.steps, NULL, 0, losses, norms, lrs);
}

static float* master_weights(const Trainer* tr) {
    float* w = (float*)mallocCheck(tr->num_params * sizeof(float));
    tr->ops->buf->to_host(w, tr->zero.master, tr->num_params);
    return w;
}

// --write-cpu-reference: the reference's configuration (dev/reference.py's), computed by the CPU trainer
static void reference_from_cpu(Reference* r) {
    r->V = GPT2_VOCAB_SIZE; r->maxT = 64; r->L = 2; r->H = 4; r->C = 64; r->B = 4; r->T = 64; r->ga = 2; r->steps = 10;
    r->warmup_steps = 4; r->warmup_type = 0;
    r->lr = 1e-3f; r->beta1 = 0.9f; r->beta2 = 0.95f; r->eps = 1e-8f; r->weight_decay = 0.1f; r->grad_clip = 1.0f;
    r->warmup_min_lr = 1e-4f; r->warmup_max_lr = 1e-3f;
    reference_set_gpt2_constants(r);
    ModelConfig c = reference_model_config(r);
    r->Vp = c.padded_vocab_size;
    size_t P = model_num_params(&c), tokens = (size_t)r->ga * r->B * r->T, bt = (size_t)r->B * r->T;
    r->num_params = (int)P;
    r->params = (float*)mallocCheck(P * sizeof(float));
    model_init_params(r->params, &c, 1337);
    // LayerNorm weights 1 + 0.1 n and biases 0.02 n, as dev/reference.py: a wrong gradient of either cannot hide
    ParamTable table = param_table(&c);
    Rng rng;
    rng_seed(&rng, 1338);
    for (int i = 0; i < table.count; i++) {
        const ParamTensor* t = &table.tensors[i];
        if (t->init_std > 0) continue;
        float* p = r->params + t->offset;
        rng_normal_fill(&rng, p, t->size, t->init_value != 0 ? 0.1f : 0.02f);
        for (size_t k = 0; k < t->size; k++) p[k] += t->init_value;
    }
    param_table_free(&table);
    r->inputs = (int*)mallocCheck(tokens * sizeof(int));
    r->targets = (int*)mallocCheck(tokens * sizeof(int));
    for (size_t i = 0; i < tokens; i++) { r->inputs[i] = (int)rng_below(&rng, r->V); r->targets[i] = (int)rng_below(&rng, r->V); }
    cpu::Model cm;
    cpu::model_build(&cm, &c, r->B, r->T);
    Trainer tr = {};
    DSConfig cfg = gpu_reference_config(r, 1);
    setup_run(&tr, r, &cpu::CPU_OPS, &cm, &cfg);
    cpu::model_forward(&cm, r->inputs, r->targets, r->B, r->T);
    r->loss = (float)cpu::model_take_loss(&cm);
    r->logits = (float*)mallocCheck(bt * r->V * sizeof(float));
    for (size_t row = 0; row < bt; row++) memcpy(r->logits + row * r->V, cm.act.logits + row * r->Vp, r->V * sizeof(float));
    r->grads = (float*)mallocCheck(P * sizeof(float));
    micro_batch_gradients(&tr, r, &cpu::CPU_OPS, &cm, 1.0f, r->grads);
    for (int run = 0; run < 2; run++) {
        r->losses[run] = (float*)mallocCheck(r->steps * sizeof(float));
        r->norms[run] = (float*)mallocCheck(r->steps * sizeof(float));
        r->lrs[run] = (float*)mallocCheck(r->steps * sizeof(float));
        cfg = gpu_reference_config(r, run == 0);
        setup_run(&tr, r, &cpu::CPU_OPS, &cm, &cfg);
        reference_train_steps(&tr, r, r->steps, NULL, 0, r->losses[run], r->norms[run], r->lrs[run]);
        r->final[run] = master_weights(&tr);
    }
    zero_free(&tr.zero);
    cpu::model_free(&cm);
}

// ----------------------------------------------------------------------------
// tests

static void test_layout_matches_reference(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = f->model;
    CHECK(model->num_params == (size_t)ref->num_params, "parameter count %zu vs reference %d", model->num_params, ref->num_params);
}

static void test_config_must_ask_for_the_build_precision(void) {
    char err[1024];
    const char* kinds[3] = {"fp32", "fp16", "bf16"};
    for (int k = 0; k < 3; k++) {
        DSConfig c;
        ds_config_defaults(&c);
        c.fp16_enabled = k == 1;
        c.bf16_enabled = k == 2;
        int rc = precision_config_check(&c, err, sizeof err);
        // accepted: the config's own precision, and a config with neither flag in a BF16 build
        int accept = strcmp(kinds[k], PRECISION_NAME) == 0 || (k == 0 && strcmp(PRECISION_NAME, "bf16") == 0);
        CHECK(accept ? rc == 0 : rc != 0 && strstr(err, "make train PRECISION=") != NULL, "config %s in a %s build: rc %d, \"%s\"",
              kinds[k], PRECISION_NAME, rc, rc ? err : "");
    }
}

static void test_forward_logits_and_loss(Fixture* f) {
    const Reference* ref = &f->ref;
    const Tolerances* tol = &f->tol;
    Model* model = f->model;
    Trainer tr = {};
    DSConfig cfg = gpu_reference_config(ref, 1);
    setup_run(&tr, ref, &GPU_OPS, model, &cfg);
    model_forward(model, ref->inputs, ref->targets, ref->B, ref->T);
    float loss = (float)model_take_loss(model);
    download_floatX(f->host_logits, model->act.logits, (size_t)ref->B * ref->T * ref->Vp);
    TensorErr e_logits = tensor_err_strided(f->host_logits, ref->logits, (size_t)ref->B * ref->T, ref->V, ref->Vp, ref->V);
    double e_loss = rel_err(loss, ref->loss, 0);
    printf("    logits rel err %.2e (tolerance %.2e), loss %.7f vs %.7f (rel err %.2e, tolerance %.2e)\n", e_logits.rel_err, tol->logits, loss,
           ref->loss, e_loss, tol->loss);
    CHECK_TENSOR(e_logits, tol->logits, "logits");
    CHECK(e_loss <= tol->loss, "loss rel err %.3e > %.3e", e_loss, tol->loss);
    zero_free(&tr.zero);
}

static void test_backward_every_gradient_tensor(Fixture* f) {
    const Reference* ref = &f->ref;
    const Tolerances* tol = &f->tol;
    Model* model = f->model;
    Trainer tr = {};
    reference_gradients(&tr, ref, model, f->host_grads);
    ParamTable table = param_table(&model->config);
    const ParamTensor* t = table.tensors;
    int n = table.count;
    double worst = 0.0;
    const char* worst_name = "";
    for (int i = 0; i < n; i++) {
        TensorErr e = tensor_err(f->host_grads + t[i].offset, ref->grads + t[i].offset, t[i].size);
        printf("    %-18s rel err %.2e\n", t[i].name, e.rel_err);
        CHECK_TENSOR(e, tol->grad, "gradient of %s", t[i].name);
        if (e.rel_err > worst) { worst = e.rel_err; worst_name = t[i].name; }
    }
    printf("    %d gradient tensors, worst rel err %.2e (%s), tolerance %.2e\n", n, worst, worst_name, tol->grad);
    param_table_free(&table);
    zero_free(&tr.zero);
}

// --recompute recomputes the norm and MLP activation outputs with the kernels that made them, so the
// gradients are the same bits as when they are stored
static void test_recompute_gives_identical_gradients(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = f->model;
    Trainer tr = {};
    Options o = f->options;
    o.recompute = 1;
    ModelConfig c = model->config;
    Model* r = (Model*)gpu_build(&c, ref->B, ref->T, &o);
    float* stored = (float*)mallocCheck(model->num_params * sizeof(float));
    reference_gradients(&tr, ref, model, stored);
    reference_gradients(&tr, ref, r, f->host_grads);
    CHECK_BITWISE(f->host_grads, stored, model->num_params, "gradients with --recompute against stored activations");
    gpu_free(r);
    free(stored);
    zero_free(&tr.zero);
}

static void check_training_run(Fixture* f, int run) {
    const Reference* ref = &f->ref;
    const Tolerances* tol = &f->tol;
    Trainer tr = {};
    float losses[64], norms[64], lrs[64];
    train_reference_run(&tr, f, run == 0, losses, norms, lrs);
    CHECK(tr.state.skipped == 0, "%lld steps skipped (overflow)", (long long)tr.state.skipped);
    for (int s = 0; s < ref->steps; s++) {
        double e = rel_err(losses[s], ref->losses[run][s], 0), t = step_loss_tolerance(ref, tol, run, s);
        printf("    step %d: loss %.6f vs %.6f (rel err %.1e, tolerance %.1e), norm %.5f vs %.5f, lr %.3e vs %.3e\n", s, losses[s], ref->losses[run][s],
               e, t, norms[s], ref->norms[run][s], lrs[s], ref->lrs[run][s]);
        CHECK(e <= t, "step %d loss rel err %.3e > %.3e", s, e, t);
        CHECK(rel_err(norms[s], ref->norms[run][s], 0) <= tol->norm, "step %d grad norm %.7f vs %.7f", s, norms[s], ref->norms[run][s]);
        CHECK(rel_err(lrs[s], ref->lrs[run][s], 0) <= tol->lr, "step %d lr %.7e vs %.7e", s, lrs[s], ref->lrs[run][s]);
    }
#if defined(ENABLE_FP32)
    float* w = master_weights(&tr);
    TensorErr e = tensor_err(w, ref->final[run], f->model->num_params);
    printf("    final weights rel err %.2e\n", e.rel_err);
    CHECK_TENSOR(e, 1e-4, "final weights");
    free(w);
#endif
    zero_free(&tr.zero);
}

static void test_ten_adamw_steps_with_clipping_and_warmup(Fixture* f) { check_training_run(f, 0); }
static void test_ten_adam_l2_steps_adam_w_mode_false(Fixture* f) { check_training_run(f, 1); }

static void test_two_runs_are_bit_identical(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = f->model;
    Trainer tr = {};
    float l1[64], n1[64], r1[64], l2[64], n2[64], r2[64];
    train_reference_run(&tr, f, 1, l1, n1, r1);
    float* first = master_weights(&tr);
    train_reference_run(&tr, f, 1, l2, n2, r2);
    float* second = master_weights(&tr);
    CHECK_BITWISE(second, first, model->num_params, "weights of two identical runs");
    CHECK_BITWISE(l2, l1, ref->steps, "losses of two identical runs");
    CHECK_BITWISE(n2, n1, ref->steps, "grad norms of two identical runs");
    free(first);
    free(second);
    zero_free(&tr.zero);
}

// What a checkpoint does (the master and moments copied to the host, later copied back in
// a fresh run, the weights shared from the master) gives back the same run: the steps after
// the restore repeat bit for bit. This needs set_weights to refresh the floatX weights.
static void test_save_restore_round_trip_is_bit_identical(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = f->model;
    Trainer tr = {};
    int first = ref->steps / 2, rest = ref->steps - first;
    float l[64], n[64], r[64], l2[64], n2[64], r2[64];
    DSConfig cfg = gpu_reference_config(ref, 1);
    setup_run(&tr, ref, &GPU_OPS, model, &cfg);
    reference_train_steps(&tr, ref, first, NULL, 0, l, n, r);
    TrainState saved = tr.state;
    size_t P = tr.zero.n;
    float* host = (float*)mallocCheck(3 * P * sizeof(float));
    DEVICE_BUFFERS.to_host(host, tr.zero.master, P);
    DEVICE_BUFFERS.to_host(host + P, tr.zero.m, P);
    DEVICE_BUFFERS.to_host(host + 2 * P, tr.zero.v, P);
    reference_train_steps(&tr, ref, rest, NULL, 0, l, n, r);
    float* after = master_weights(&tr);
    train_reference_run(&tr, f, 0, l2, n2, r2); // something else in between
    setup_run(&tr, ref, &GPU_OPS, model, &cfg);    // a fresh run, then the restore
    DEVICE_BUFFERS.from_host(tr.zero.master, host, P);
    DEVICE_BUFFERS.from_host(tr.zero.m, host + P, P);
    DEVICE_BUFFERS.from_host(tr.zero.v, host + 2 * P, P);
    zero_share_weights(&tr);
    tr.state = saved;
    reference_train_steps(&tr, ref, rest, NULL, 0, l2, n2, r2);
    float* again = master_weights(&tr);
    CHECK_BITWISE(l2, l, rest, "losses after the restore");
    CHECK_BITWISE(again, after, tr.num_params, "weights after the restore");
    free(host); free(after); free(again);
    zero_free(&tr.zero);
}

// An inf in the gradients (as an fp16 overflow) skips exactly that step: with DeepSpeed's
// static fp16 scale, 4 steps with an overflow at the second equal 3 clean steps bit for bit.
static void test_injected_overflow_skips_exactly_that_step(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = f->model;
    Trainer tr = {};
    float l[64], n[64], r[64];
    DSConfig cfg = gpu_reference_config(ref, 1);
    cfg.fp16_enabled = 1; // the overflow check is part of fp16's loss scaling
    cfg.fp16_loss_scale = 65536.0;
    int inject = 1;
    setup_run(&tr, ref, &GPU_OPS, model, &cfg);
    reference_train_steps(&tr, ref, 4, &inject, 1, l, n, r);
    CHECK(tr.state.step == 4 && tr.state.skipped == 1 && tr.state.adam_t == 3, "step %lld skipped %lld t %lld", (long long)tr.state.step,
          (long long)tr.state.skipped, (long long)tr.state.adam_t);
    CHECK(isnan(n[1]) && isfinite(n[2]), "the skipped step has no norm");
    float* skipped = master_weights(&tr);
    setup_run(&tr, ref, &GPU_OPS, model, &cfg);
    reference_train_steps(&tr, ref, 3, NULL, 0, l, n, r);
    float* clean = master_weights(&tr);
    CHECK_BITWISE(skipped, clean, tr.num_params, "weights against the run without the skipped step");
    free(skipped);
    free(clean);
    zero_free(&tr.zero);
}

// The global-norm and inf/nan kernels against the host, and an injected inf or nan seen.
static void test_grad_stats_match_host_and_see_inf_nan(Fixture* f) {
    const Reference* ref = &f->ref;
    Model* model = f->model;
    Trainer tr = {};
    reference_gradients(&tr, ref, model, f->host_grads);
    DEVICE_BUFFERS.to_host(f->host_grads, tr.zero.grads, tr.num_params); // as the step logic sees them (scaled)
    int nonfinite;
    double sumsq, again, host_sumsq = 0.0;
    for (size_t i = 0; i < tr.num_params; i++) host_sumsq += (double)f->host_grads[i] * f->host_grads[i];
    DEVICE_BUFFERS.stats(tr.zero.grads, tr.num_params, &nonfinite, &sumsq);
    // both sum the exact fp64 squares in fp64, each within n 2^-53 of the exact sum
    double bound = 2.0 * tr.num_params * ldexp(1.0, -53);
    CHECK(nonfinite == 0 && rel_err(sumsq, host_sumsq, 0) <= bound, "sum of squares %.17g vs host %.17g, nonfinite %d", sumsq, host_sumsq, nonfinite);
    DEVICE_BUFFERS.stats(tr.zero.grads, tr.num_params, &nonfinite, &again);
    CHECK(memcmp(&sumsq, &again, sizeof(double)) == 0, "two sums of the same gradients differ");
    const float inf = INFINITY, nan = NAN, zero = 0.0f;
    size_t last = tr.num_params - 1;
    DEVICE_BUFFERS.from_host(tr.zero.grads + last, &inf, 1);
    DEVICE_BUFFERS.stats(tr.zero.grads, tr.num_params, &nonfinite, &sumsq);
    CHECK(nonfinite == 1, "an inf in the last gradient was not seen");
    DEVICE_BUFFERS.from_host(tr.zero.grads + last, &zero, 1);
    DEVICE_BUFFERS.from_host(tr.zero.grads, &nan, 1);
    DEVICE_BUFFERS.stats(tr.zero.grads, tr.num_params, &nonfinite, &sumsq);
    CHECK(nonfinite == 1, "a nan in the first gradient was not seen");
    DEVICE_BUFFERS.from_host(tr.zero.grads, &zero, 1);
    // beyond fp16's range: an overflow where DeepSpeed's gradients are fp16, not in the other builds
    const float below = 65519.0f, above = -65520.0f; // fp16 rounds 65519 to 65504, its largest value, and 65520 to inf
    DEVICE_BUFFERS.from_host(tr.zero.grads + last, &below, 1);
    DEVICE_BUFFERS.stats(tr.zero.grads, tr.num_params, &nonfinite, &sumsq);
    CHECK(nonfinite == 0, "65519 (fp16: 65504) counted as an overflow");
    DEVICE_BUFFERS.from_host(tr.zero.grads + last, &above, 1);
    DEVICE_BUFFERS.stats(tr.zero.grads, tr.num_params, &nonfinite, &sumsq);
    int fp16 = strcmp(PRECISION_NAME, "fp16") == 0;
    CHECK(nonfinite == fp16, "-65520 in a %s build: %d overflow(s) counted, expected %d", PRECISION_NAME, nonfinite, fp16);
    zero_free(&tr.zero);
}

int main(int argc, char** argv) {
    Fixture f = {};
    Reference* ref = &f.ref;
    if (argc == 3 && strcmp(argv[1], "--write-cpu-reference") == 0) {
        double t0 = wall_seconds();
        reference_from_cpu(ref);
        reference_save(ref, argv[2]);
        printf("wrote %s: the CPU trainer's reference (%.1f s)\n", argv[2], wall_seconds() - t0);
        return 0;
    }
    const char* path = argc > 1 ? argv[1] : "dev/data/gpt2_reference.bin";
    reference_load(ref, path);
    // the attention kernels' shared memory grows with the head size; a device with too little
    // (FP32 at head size 128 on an H100) cannot run the model: the GPU trainer refuses it
    cuda_setup();
    int hs = ref->C / ref->H, att_bytes = ATT_DKDV_LAYOUT(hs).bytes;
    if (att_bytes > (int)device_prop.sharedMemPerBlockOptin) {
        printf("skipped: %s: head size %d needs %d bytes of shared memory per attention block in %s, %s allows %zu\n", path, hs, att_bytes,
               PRECISION_NAME, device_prop.name, (size_t)device_prop.sharedMemPerBlockOptin);
        printf("0 passed, 0 failed, 1 skipped\n");
        return 0;
    }
    f.tol = tolerances(ref);
    ModelConfig c = reference_model_config(ref);
    options_defaults(&f.options);
    f.model = (Model*)gpu_build(&c, ref->B, ref->T, &f.options);
    f.host_grads = (float*)mallocCheck(f.model->num_params * sizeof(float));
    f.host_logits = (float*)mallocCheck((size_t)ref->B * ref->T * ref->Vp * sizeof(float));
    printf("reference: %s: %s, %d layers, %d heads (%d key/value), %d channels, B %d, T %d, %d micro batches, %d steps; %s build on %s\n", path,
           arch_name(ref->arch), ref->L, ref->H, ref->num_kv_heads, ref->C, ref->B, ref->T, ref->ga, ref->steps, PRECISION_NAME, device_prop.name);
    RUN_WITH(test_layout_matches_reference, &f);
    RUN(test_config_must_ask_for_the_build_precision);
    RUN_WITH(test_forward_logits_and_loss, &f);
    RUN_WITH(test_backward_every_gradient_tensor, &f);
    RUN_WITH(test_recompute_gives_identical_gradients, &f);
    RUN_WITH(test_ten_adamw_steps_with_clipping_and_warmup, &f);
    RUN_WITH(test_ten_adam_l2_steps_adam_w_mode_false, &f);
    RUN_WITH(test_two_runs_are_bit_identical, &f);
    RUN_WITH(test_save_restore_round_trip_is_bit_identical, &f);
    RUN_WITH(test_injected_overflow_skips_exactly_that_step, &f);
    RUN_WITH(test_grad_stats_match_host_and_see_inf_nan, &f);
    gpu_free(f.model);
    free(f.host_grads);
    free(f.host_logits);
    return test_summary();
}
