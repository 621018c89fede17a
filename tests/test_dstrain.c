/*
test_dstrain.c: tests of the shared runtime (dstrain.h) that need no model: config
reading and validation, DeepSpeed's batch rules, LR schedules against an independent
Python implementation, the loss scaler and step logic against traces worked out from
DeepSpeed's algorithm, the data loader, checkpoint files, safetensors files and Hugging
Face model directories, and the tokenizer.

    make test_dstrain && python3 tests/schedule_reference.py DIR/sched && ./test_dstrain DIR
(DIR: any folder for the files the tests write, for example from mktemp -d; `make test`
does both in a temporary folder of its own)
*/
#include "../dstrain.h"
#include "test.h"

static const char* TMP; // the folder given as argument, for every file the tests write
static char err[2048];

// TMP/name in out, a buffer of PATH_LEN bytes
static const char* tmp_path(char* out, const char* name) {
    format_path(out, PATH_LEN, "%s/%s", TMP, name);
    return out;
}

// What an error about the file TMP/name says: before, then the path in quotes.
static const char* names_tmp(const char* before, const char* name) {
    static char text[PATH_LEN + 256];
    format_path(text, sizeof text, "%s'%s/%s'", before, TMP, name);
    return text;
}

static const char* write_tmp(const char* name, const char* text) {
    static char path[PATH_LEN];
    FILE* f = fopenCheck(tmp_path(path, name), "w");
    fputs(text, f);
    fclose(f);
    return path;
}

static int load_text_config(DSConfig* c, const char* json) {
    err[0] = '\0';
    int rc = ds_config_load(c, write_tmp("config.json", json), err, sizeof err);
    if (rc == 0) rc = ds_config_validate(c, err, sizeof err);
    return rc;
}

// ----------------------------------------------------------------------------
// config

static void test_sample_config_loads_unchanged(void) {
    DSConfig c;
    int rc = ds_config_load(&c, "configs/ds_config.json", err, sizeof err);
    CHECK(rc == 0, "%s", err);
    rc = ds_config_validate(&c, err, sizeof err);
    CHECK(rc == 0, "%s", err);
    CHECK(c.fp16_enabled == 1 && c.fp16_loss_scale == 0 && c.fp16_initial_scale_power == 16, "fp16 section");
    CHECK(c.fp16_loss_scale_window == 1000 && c.fp16_hysteresis == 2 && c.fp16_min_loss_scale == 1, "fp16 scaler keys");
    CHECK(str_ieq(c.optimizer_type, "AdamW") && c.lr == 5e-5 && c.betas[0] == 0.9 && c.betas[1] == 0.999, "optimizer");
    CHECK(c.eps == 1e-8 && c.weight_decay == 3e-7 && c.adam_w_mode == 1, "optimizer params");
    CHECK(c.zero_stage == 2 && c.reduce_bucket_size == 500000000 && c.allgather_bucket_size == 500000000, "zero sizes");
    CHECK(c.overlap_comm == 1 && c.contiguous_gradients == 1 && c.reduce_scatter == 1 && c.allgather_partitions == 1, "zero flags");
    CHECK(c.steps_per_print == 2000 && c.wall_clock_breakdown == 0, "logging keys");
    CHECK(c.train_batch_size == 16 && c.grad_accum == 4 && c.micro_batch == -1, "batch keys");
    CHECK(c.gradient_clipping == 1.0 && c.scheduler == SCHED_NONE, "defaults: clipping 1.0 and no scheduler");
    // section 2: mb 4 on one rank, 2 on two, refused on eight
    DSConfig c1 = c, c2 = c, c8 = c;
    CHECK(ds_resolve_batch(&c1, 1, err, sizeof err) == 0 && c1.micro_batch == 4 && c1.grad_accum == 4, "1 rank: mb %lld", (long long)c1.micro_batch);
    CHECK(ds_resolve_batch(&c2, 2, err, sizeof err) == 0 && c2.micro_batch == 2 && c2.grad_accum == 4, "2 ranks: mb %lld", (long long)c2.micro_batch);
    rc = ds_resolve_batch(&c8, 8, err, sizeof err);
    CHECK_ERR(rc, err, "Micro batch size per gpu: 0 has to be greater than 0");
    CHECK(strstr(err, "train_batch_size must be at least 32") != NULL, "hint says what to change: %s", err);
}

static void test_malformed_json_names_line_and_column(void) {
    DSConfig c;
    int rc = load_text_config(&c, "{\n  \"fp16\": {\n    \"enabled\": true,\n  }\n}\n");
    CHECK_ERR(rc, err, "line 4, column 3");
    CHECK(strstr(err, "config.json") != NULL && strstr(err, "malformed JSON") != NULL, "%s", err);
    rc = load_text_config(&c, "{\"train_batch_size\": 8");
    CHECK_ERR(rc, err, "expected ',' or '}'");
    rc = load_text_config(&c, "{\"a\": tru}");
    CHECK_ERR(rc, err, "line 1, column 7");
    rc = load_text_config(&c, "{\"a\": 1} x");
    CHECK_ERR(rc, err, "unexpected content after the end");
    rc = load_text_config(&c, "{\"a\": 01}");
    CHECK_ERR(rc, err, "expected ',' or '}'");
    rc = load_text_config(&c, "{\"a\": \"x\n\"}");
    CHECK_ERR(rc, err, "control character");
    rc = load_text_config(&c, "{\"a\": 1, \"a\": 2}");
    CHECK_ERR(rc, err, "duplicate key \"a\"");
    rc = load_text_config(&c, "[1, 2]");
    CHECK_ERR(rc, err, "top level must be a JSON object");
    rc = load_text_config(&c, "");
    CHECK_ERR(rc, err, "unexpected end of input");
    char path[PATH_LEN];
    rc = ds_config_load(&c, tmp_path(path, "does_not_exist.json"), err, sizeof err);
    CHECK_ERR(rc, err, names_tmp("cannot open ", "does_not_exist.json"));
}

static void test_wrong_types_name_the_key(void) {
    DSConfig c;
    int rc = load_text_config(&c, "{\"fp16\": {\"enabled\": \"yes\"}}");
    CHECK_ERR(rc, err, "key 'fp16.enabled' must be true or false, got a string");
    rc = load_text_config(&c, "{\"train_batch_size\": 8.5}");
    CHECK_ERR(rc, err, "key 'train_batch_size' must be an integer, got a non-integer number");
    rc = load_text_config(&c, "{\"gradient_accumulation_steps\": \"4\"}");
    CHECK_ERR(rc, err, "key 'gradient_accumulation_steps' must be an integer, got a string");
    rc = load_text_config(&c, "{\"optimizer\": {\"params\": {\"lr\": [1]}}}");
    CHECK_ERR(rc, err, "key 'optimizer.params.lr' must be a number, got an array");
    rc = load_text_config(&c, "{\"optimizer\": {\"params\": {\"betas\": [0.9]}}}");
    CHECK_ERR(rc, err, "key 'optimizer.params.betas' must be an array of two numbers");
    rc = load_text_config(&c, "{\"zero_optimization\": 2}");
    CHECK_ERR(rc, err, "key 'zero_optimization' must be an object, got a number");
    rc = load_text_config(&c, "{\"optimizer\": {\"type\": 3}}");
    CHECK_ERR(rc, err, "key 'optimizer.type' must be a string, got a number");
}

static void test_invalid_values_are_refused(void) {
    DSConfig c;
    struct { const char* json; const char* want; } cases[] = {
        {"{\"fp16\": {\"enabled\": true}, \"bf16\": {\"enabled\": true}}", "bfloat16 and fp16 modes cannot be simultaneously enabled"},
        {"{\"fp16\": {\"loss_scale\": -1}}", "key 'fp16.loss_scale' must be 0 (dynamic) or a positive finite number"},
        {"{\"fp16\": {\"loss_scale\": NaN}}", "key 'fp16.loss_scale'"},
        {"{\"fp16\": {\"loss_scale\": Infinity}}", "key 'fp16.loss_scale'"},
        {"{\"fp16\": {\"loss_scale_window\": 0}}", "key 'fp16.loss_scale_window' must be > 0"},
        {"{\"fp16\": {\"min_loss_scale\": 0}}", "key 'fp16.min_loss_scale' must be > 0"},
        {"{\"fp16\": {\"hysteresis\": 0}}", "key 'fp16.hysteresis' must be >= 1"},
        {"{\"optimizer\": {\"type\": \"SGD\"}}", "\"SGD\" is not supported"},
        {"{\"optimizer\": {\"params\": {\"max_grad_norm\": 1.0}}}", "'gradient_clipping'"},
        {"{\"optimizer\": {\"params\": {\"betas\": [0.9, 1.0]}}}", "key 'optimizer.params.betas' must be two numbers in [0, 1)"},
        {"{\"optimizer\": {\"params\": {\"eps\": 0}}}", "key 'optimizer.params.eps' must be > 0"},
        {"{\"optimizer\": {\"params\": {\"lr\": -0.1}}}", "key 'optimizer.params.lr' must be >= 0"},
        {"{\"scheduler\": {\"type\": \"OneCycle\"}}", "\"OneCycle\" is not supported"},
        {"{\"scheduler\": {\"type\": \"WarmupDecayLR\", \"params\": {}}}", "'scheduler.params.total_num_steps' is required by WarmupDecayLR"},
        {"{\"scheduler\": {\"type\": \"WarmupLR\", \"params\": {\"warmup_type\": \"cubic\"}}}", "must be \"log\" or \"linear\""},
        {"{\"gradient_clipping\": -1}", "key 'gradient_clipping' must be >= 0"},
        {"{\"zero_optimization\": {\"stage\": 3}}", "stage 3 is not supported yet"},
        {"{\"zero_optimization\": {\"stage\": 7}}", "must be 0, 1 or 2"},
        {"{\"zero_optimization\": {\"allgather_bucket_size\": 3}}", "positive even number"},
        {"{\"zero_optimization\": {\"reduce_bucket_size\": 0}}", "'zero_optimization.reduce_bucket_size' must be > 0"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int rc = load_text_config(&c, cases[i].json);
        CHECK_ERR(rc, err, cases[i].want);
    }
    // accepted: Adam in any case is AdamW-mode by default, unknown keys are ignored, null is the default
    int rc = load_text_config(&c, "{\"optimizer\": {\"type\": \"adam\"}, \"some_future_key\": {\"x\": 1}, \"fp16\": {\"hysteresis\": null}}");
    CHECK(rc == 0, "%s", err);
    CHECK(c.adam_w_mode == 1 && c.fp16_hysteresis == 2, "adam_w_mode default true, null keeps the default");
}

// ----------------------------------------------------------------------------
// batch: every row of doc/deepspeed.md section 2 and every error, in DeepSpeed's order

static int resolve(int64_t tb, int64_t mb, int64_t ga, int ws, DSConfig* c) {
    ds_config_defaults(c);
    c->train_batch_size = tb; c->micro_batch = mb; c->grad_accum = ga;
    err[0] = '\0';
    return ds_resolve_batch(c, ws, err, sizeof err);
}

static void test_batch_table(void) {
    DSConfig c;
    const int64_t N = -1; // not given
    struct { int64_t tb, mb, ga; int ws; int64_t want_tb, want_mb, want_ga; } rows[] = {
        {32, 4, 2, 4, 32, 4, 2},   // tb, mb, ga: nothing derived
        {32, 4, N, 2, 32, 4, 4},   // tb, mb: ga = tb // mb // ws
        {30, 4, N, 2, 30, 4, 3},   //   floor division (then the product check fails, below)
        {32, N, 2, 4, 32, 4, 2},   // tb, ga: mb = tb // ws // ga
        {N, 3, 5, 2, 30, 3, 5},    // mb, ga: tb = mb * ga * ws
        {24, N, N, 4, 24, 6, 1},   // tb: ga = 1, mb = tb // ws
        {N, 7, N, 3, 21, 7, 1},    // mb: ga = 1, tb = mb * ws
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        int rc = resolve(rows[i].tb, rows[i].mb, rows[i].ga, rows[i].ws, &c);
        CHECK(c.train_batch_size == rows[i].want_tb && c.micro_batch == rows[i].want_mb && c.grad_accum == rows[i].want_ga,
              "row %zu: got tb %lld mb %lld ga %lld", i, (long long)c.train_batch_size, (long long)c.micro_batch, (long long)c.grad_accum);
        if (i == 2) { CHECK_ERR(rc, err, "30 != 4 * 3 * 2"); }
        else { CHECK(rc == 0, "row %zu: %s", i, err); }
    }
    int rc = resolve(N, N, 4, 1, &c);
    CHECK_ERR(rc, err, "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided");
    rc = resolve(0, 0, N, 1, &c); // both bad: the train batch is checked first
    CHECK_ERR(rc, err, "Train batch size: 0 has to be greater than 0");
    rc = resolve(8, 0, 2, 1, &c);
    CHECK_ERR(rc, err, "Micro batch size per gpu: 0 has to be greater than 0");
    rc = resolve(16, N, 4, 8, &c); // the sample config on 8 ranks
    CHECK_ERR(rc, err, "Micro batch size per gpu: 0 has to be greater than 0");
    rc = resolve(2, 4, N, 1, &c);
    CHECK_ERR(rc, err, "Gradient accumulation steps: 0 has to be greater than 0");
    CHECK(strstr(err, "raise train_batch_size to at least 4") != NULL, "hint: %s", err);
    rc = resolve(10, 4, 2, 1, &c);
    CHECK_ERR(rc, err, "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 10 != 4 * 2 * 1");
    CHECK(strstr(err, "must be a multiple of 4 here, for example 12") != NULL, "hint: %s", err);
}

// ----------------------------------------------------------------------------
// schedules: lr_at against tests/schedule_reference.py (an independent implementation)

static void test_schedules_match_reference(void) {
    char path[PATH_LEN];
    format_path(path, sizeof path, "%s/sched/expected.txt", TMP);
    FILE* f = fopen(path, "r");
    CHECK(f != NULL, "missing %s: run tests/schedule_reference.py first", path);
    if (!f) return;
    char name[64], loaded[64] = "";
    long long it;
    double want;
    int compared = 0;
    DSConfig c;
    while (fscanf(f, "%63s %lld %lf", name, &it, &want) == 3) {
        if (strcmp(name, loaded) != 0) {
            char cpath[PATH_LEN];
            format_path(cpath, sizeof cpath, "%s/sched/%s", TMP, name);
            int rc = ds_config_load(&c, cpath, err, sizeof err);
            if (rc == 0) rc = ds_config_validate(&c, err, sizeof err);
            CHECK(rc == 0, "%s", err);
            strcpy(loaded, name);
        }
        double got = lr_at(&c, it);
        // double arithmetic on both sides, same formulas: agreement to a few ulps
        CHECK(rel_err(got, want, 1e-300) < 1e-12 || (want == 0 && got == 0), "%s it %lld: got %.17g want %.17g", name, it, got, want);
        compared++;
    }
    fclose(f);
    CHECK(compared == 8 * 42, "compared %d values", compared);
    // hand-checked anchors: WarmupLR's first two updates use warmup_min_lr; W = max(2, n)
    ds_config_defaults(&c);
    c.scheduler = SCHED_WARMUP_LR; c.warmup_min_lr = 0.25; c.warmup_max_lr = 1.0; c.warmup_num_steps = 4;
    CHECK(lr_at(&c, -1) == 0.25 && lr_at(&c, 0) == 0.25, "first two updates at min");
    CHECK(fabs(lr_at(&c, 1) - (0.25 + 0.75 * log(2) / log(4))) < 1e-15 && lr_at(&c, 4) == 1.0, "log warmup");
}

// ----------------------------------------------------------------------------
// loss scaler and step logic: traces worked out by hand from doc/deepspeed.md
// sections 3 and 4

static DSConfig fp16_config(double loss_scale, int power, int window, int hysteresis, int consecutive, double min_scale) {
    DSConfig c;
    ds_config_defaults(&c);
    c.fp16_enabled = 1; c.fp16_loss_scale = loss_scale; c.fp16_initial_scale_power = power;
    c.fp16_loss_scale_window = window; c.fp16_hysteresis = hysteresis; c.fp16_consecutive_hysteresis = consecutive;
    c.fp16_min_loss_scale = min_scale;
    return c;
}

static void test_scaler_defaults_first_overflow_spends_hysteresis(void) {
    DSConfig c = fp16_config(0, 16, 1000, 2, 0, 1);
    LossScaler s;
    loss_scaler_init(&s, &c);
    CHECK(s.scale == 65536 && s.hyst == 2, "start 2^16, hysteresis 2");
    loss_scaler_update(&s, 1, 0);
    CHECK(s.scale == 65536 && s.hyst == 1 && s.last_overflow_iter == 0, "first overflow: scale kept, hyst 1");
    loss_scaler_update(&s, 1, 0);
    CHECK(s.scale == 32768 && s.hyst == 1 && s.last_overflow_iter == 1, "second overflow halves");
    loss_scaler_update(&s, 1, 0);
    CHECK(s.scale == 16384, "third overflow halves again");
}

static void test_scaler_window_growth_on_1001st_clean_step(void) {
    DSConfig c = fp16_config(0, 16, 1000, 2, 0, 1);
    LossScaler s;
    loss_scaler_init(&s, &c);
    for (int i = 0; i < 1000; i++) loss_scaler_update(&s, 0, 0);
    CHECK(s.scale == 65536, "1000 clean steps: still 2^16 (got %g)", s.scale);
    loss_scaler_update(&s, 0, 0);
    CHECK(s.scale == 131072, "1001st clean step doubles (got %g)", s.scale);
    for (int i = 0; i < 999; i++) loss_scaler_update(&s, 0, 0);
    CHECK(s.scale == 131072, "next 999 keep it");
    loss_scaler_update(&s, 0, 0);
    CHECK(s.scale == 262144, "and the 1000th after doubles again");
}

static void test_scaler_hysteresis_refills_only_on_growth(void) {
    DSConfig c = fp16_config(0, 16, 10, 2, 0, 1);
    LossScaler s;
    loss_scaler_init(&s, &c);
    loss_scaler_update(&s, 1, 0);              // iter 0: overflow, hyst 2 -> 1
    for (int i = 0; i < 5; i++) loss_scaler_update(&s, 0, 0); // iters 1..5 clean
    CHECK(s.hyst == 1, "clean steps do not refill hysteresis (hyst %lld)", (long long)s.hyst);
    loss_scaler_update(&s, 1, 0);              // iter 6: overflow with hyst 1 halves
    CHECK(s.scale == 32768 && s.last_overflow_iter == 6, "halved at iter 6");
    for (int i = 7; i <= 16; i++) loss_scaler_update(&s, 0, 0); // stable = i - 6 - 1: 10 at i = 17
    CHECK(s.scale == 32768 && s.hyst == 1, "not yet grown at iter 16");
    loss_scaler_update(&s, 0, 0);              // iter 17: stable 10 % 10 == 0 -> grow, refill
    CHECK(s.scale == 65536 && s.hyst == 2, "grown and refilled at iter 17 (scale %g hyst %lld)", s.scale, (long long)s.hyst);
}

static void test_scaler_consecutive_hysteresis(void) {
    DSConfig c = fp16_config(0, 16, 1000, 2, 1, 1);
    LossScaler s;
    loss_scaler_init(&s, &c);
    loss_scaler_update(&s, 1, 0);
    CHECK(s.hyst == 1 && s.scale == 65536, "overflow spends hysteresis");
    loss_scaler_update(&s, 0, 0);
    CHECK(s.hyst == 2, "a clean step refills it");
    loss_scaler_update(&s, 1, 0);
    loss_scaler_update(&s, 0, 0);
    loss_scaler_update(&s, 1, 0);
    CHECK(s.scale == 65536, "alternating overflows never halve with consecutive hysteresis");
    loss_scaler_update(&s, 1, 0);
    CHECK(s.scale == 32768, "two in a row do");
}

static void test_scaler_minimum_floor_and_fatal(void) {
    DSConfig c = fp16_config(0, 2, 1000, 1, 0, 1.5); // S = 4, min 1.5, no hysteresis
    LossScaler s;
    loss_scaler_init(&s, &c);
    CHECK(loss_scaler_update(&s, 1, 0) == 0 && s.scale == 2, "4 -> 2");
    CHECK(loss_scaler_update(&s, 1, 0) == 0 && s.scale == 1.5, "2 -> max(1, 1.5) = 1.5");
    CHECK(loss_scaler_update(&s, 1, 0) == -1, "at the minimum: fatal");
}

static void test_scaler_static_scale(void) {
    DSConfig c = fp16_config(128, 16, 1000, 2, 0, 1);
    TrainState st;
    train_state_init(&st, &c);
    CHECK(st.scaler.scale == 128 && !st.scaler.dynamic, "static 128");
    StepPlan p = step_plan(&st, &c, 1, 0.0);
    CHECK(p.skip && p.overflow, "an overflowing step is still skipped");
    step_finish(&st, &p, 0);
    for (int i = 0; i < 3000; i++) { p = step_plan(&st, &c, 0, 1.0); step_finish(&st, &p, 0); }
    CHECK(st.scaler.scale == 128 && st.skipped == 1 && st.adam_t == 3000, "static scale never changes");
}

static void test_step_plan_skip_and_clip(void) {
    DSConfig c = fp16_config(0, 10, 1000, 1, 0, 1); // S = 1024, no hysteresis
    c.gradient_clipping = 0.5;
    c.scheduler = SCHED_WARMUP_LR; c.warmup_min_lr = 0.0; c.warmup_max_lr = 1.0; c.warmup_num_steps = 10; c.warmup_type = WARMUP_LINEAR;
    TrainState st;
    train_state_init(&st, &c);
    // applied step: true norm 2 (scaled sumsq = (2 * 1024)^2), clip 0.5 -> factor 1 / (1024 * (2 + 1e-6) / 0.5)
    StepPlan p = step_plan(&st, &c, 0, 2048.0 * 2048.0);
    CHECK(!p.skip && p.grad_norm == 2.0 && p.adam_t == 1 && p.lr == 0.0f, "norm %g t %lld lr %g", p.grad_norm, (long long)p.adam_t, p.lr);
    CHECK(rel_err(p.grad_factor, 1.0 / (1024.0 * (2.0 + 1e-6) / 0.5), 0) < 1e-7, "factor %g", p.grad_factor);
    step_finish(&st, &p, 0);
    // overflow: skipped, t and schedule do not advance, the scale halves
    p = step_plan(&st, &c, 1, 0.0);
    CHECK(p.skip, "skip");
    step_finish(&st, &p, 0);
    CHECK(st.step == 2 && st.skipped == 1 && st.adam_t == 1 && st.sched_it == 0 && st.scaler.scale == 512, "counters after skip");
    // below the clip threshold the factor is only the unscale
    p = step_plan(&st, &c, 0, 0.1 * 0.1 * 512.0 * 512.0);
    CHECK(p.adam_t == 2 && rel_err(p.grad_factor, 1.0 / 512.0, 0) < 1e-7 && rel_err(p.grad_norm, 0.1, 0) < 1e-12, "no clipping under threshold");
    CHECK(p.lr == 0.0f, "schedule it 0 still gives the minimum lr, got %g", p.lr);
    // without fp16, nothing is ever skipped and the scale is 1
    DSConfig f32;
    ds_config_defaults(&f32);
    train_state_init(&st, &f32);
    p = step_plan(&st, &f32, 1, 4.0);
    CHECK(!p.skip && p.scale == 1 && p.grad_norm == 2.0, "fp32 does not skip");
}

// ----------------------------------------------------------------------------
// data loader

// Shard of n tokens of `width` bytes whose token i is `first + i` (mod 65536 for uint16):
// a sequence is identified by its first token.
static const char* write_shard_width(const char* name, int width, uint32_t first, int n, int magic, int version, int header_count) {
    static char path[PATH_LEN];
    FILE* f = fopenCheck(tmp_path(path, name), "wb");
    int32_t header[256] = {0};
    header[0] = magic; header[1] = version; header[2] = header_count;
    fwrite(header, sizeof header, 1, f);
    for (int i = 0; i < n; i++) {
        uint16_t t16 = (uint16_t)(first + i);
        uint32_t t32 = first + (uint32_t)i;
        fwrite(width == 2 ? (void*)&t16 : (void*)&t32, width, 1, f);
    }
    fclose(f);
    return path;
}

static const char* write_shard(const char* name, int first, int n, int magic, int version, int header_count) {
    return write_shard_width(name, 2, (uint32_t)first, n, magic, version, header_count);
}

static void write_three_shards(void) {
    write_shard("dl_a.bin", 0, 1000, SHARD_MAGIC, 1, 1000);     // 1000 tokens: 99 sequences of 10+1
    write_shard("dl_b.bin", 20000, 501, SHARD_MAGIC, 1, 501);   // 50 sequences
    write_shard("dl_c.bin", 40000, 305, SHARD_MAGIC, 1, 305);   // 30 sequences
}

static void test_loader_epoch_covers_each_sequence_once_and_ranks_are_disjoint(void) {
    write_three_shards();
    char pattern[PATH_LEN];
    format_path(pattern, sizeof pattern, "%s/dl_*.bin", TMP);
    const int T = 10, B = 2, ga = 3;
    for (int world = 1; world <= 3; world++) {
        size_t global = (size_t)B * ga * world;
        static int seen[65536];
        memset(seen, 0, sizeof seen);
        size_t epoch_seqs = 0;
        for (int rank = 0; rank < world; rank++) {
            DataLoader L;
            int rc = dataloader_init(&L, pattern, B, T, rank, world, global, 1, 42, 65536, err, sizeof err);
            CHECK(rc == 0, "%s", err);
            if (rc) return;
            CHECK(L.num_seqs == 179, "179 sequences, got %zu", L.num_seqs);
            epoch_seqs = L.seqs_per_epoch;
            CHECK(epoch_seqs == 179 / global * global, "epoch drops the partial global batch");
            size_t micro_batches = epoch_seqs / ((size_t)world * B);
            for (size_t k = 0; k < micro_batches; k++) {
                dataloader_next(&L);
                for (int b = 0; b < B; b++) {
                    int first = L.inputs[b * T];
                    seen[first]++;
                    int ok = (first % 10 == 0) || (first >= 20000 && (first - 20000) % 10 == 0) || (first >= 40000 && (first - 40000) % 10 == 0);
                    CHECK(ok, "sequence starts on a stride boundary (token %d)", first);
                    for (int t = 0; t < T; t++) {
                        CHECK(L.inputs[b * T + t] == first + t && L.targets[b * T + t] == first + t + 1, "targets are inputs shifted by one");
                    }
                }
            }
            CHECK(L.epoch == 1 && L.cursor == 0, "one epoch consumed");
            dataloader_free(&L);
        }
        size_t distinct = 0, repeated = 0;
        for (int i = 0; i < 65536; i++) { distinct += seen[i] > 0; repeated += seen[i] > 1; }
        CHECK(distinct == epoch_seqs && repeated == 0, "world %d: %zu distinct sequences (want %zu), %zu repeated", world, distinct, epoch_seqs, repeated);
    }
}

// The sequences of an optimizer step do not depend on how the global batch is split.
static void test_loader_step_contents_independent_of_split(void) {
    write_three_shards();
    char pattern[PATH_LEN];
    format_path(pattern, sizeof pattern, "%s/dl_*.bin", TMP);
    const int T = 10;
    struct { int world, B, ga; } splits[] = {{1, 12, 1}, {2, 3, 2}, {3, 2, 2}, {4, 1, 3}};
    long sums[4][5];
    for (int s = 0; s < 4; s++) {
        for (int step = 0; step < 5; step++) sums[s][step] = 0;
        for (int rank = 0; rank < splits[s].world; rank++) {
            DataLoader L;
            dataloader_init(&L, pattern, splits[s].B, T, rank, splits[s].world, 12, 1, 7, 65536, err, sizeof err);
            for (int step = 0; step < 5; step++) {
                for (int g = 0; g < splits[s].ga; g++) {
                    dataloader_next(&L);
                    for (int b = 0; b < splits[s].B; b++) sums[s][step] += (long)L.inputs[b * T] * L.inputs[b * T] + L.inputs[b * T];
                }
            }
            dataloader_free(&L);
        }
    }
    for (int s = 1; s < 4; s++) {
        for (int step = 0; step < 5; step++) CHECK(sums[s][step] == sums[0][step], "split %d step %d has other sequences", s, step);
    }
}

static void test_loader_seek_resumes_and_epochs_reshuffle(void) {
    write_three_shards();
    char pattern[PATH_LEN];
    format_path(pattern, sizeof pattern, "%s/dl_*.bin", TMP);
    DataLoader a, b;
    dataloader_init(&a, pattern, 4, 10, 0, 1, 8, 1, 3, 65536, err, sizeof err);
    dataloader_init(&b, pattern, 4, 10, 0, 1, 8, 1, 3, 65536, err, sizeof err);
    for (int i = 0; i < 7; i++) dataloader_next(&a);
    dataloader_seek(&b, a.epoch, a.cursor);
    int same = 1;
    for (int i = 0; i < 50; i++) { // crosses into the next epoch
        dataloader_next(&a); dataloader_next(&b);
        same &= memcmp(a.inputs, b.inputs, 40 * sizeof(int)) == 0 && a.epoch == b.epoch && a.cursor == b.cursor;
    }
    CHECK(same, "a seek to a saved position continues identically");
    // epoch 0 and epoch 1 visit the same sequences in a different order
    dataloader_seek(&a, 0, 0);
    dataloader_seek(&b, 1, 0);
    int differ = 0;
    long sum_a = 0, sum_b = 0;
    for (int i = 0; i < 44; i++) { // 176 / 4
        dataloader_next(&a); dataloader_next(&b);
        for (int k = 0; k < 4; k++) { sum_a += a.inputs[k * 10]; sum_b += b.inputs[k * 10]; }
        differ |= memcmp(a.inputs, b.inputs, 40 * sizeof(int)) != 0;
    }
    CHECK(differ, "each epoch has its own order");
    CHECK(sum_a == sum_b || a.seqs_per_epoch != a.num_seqs, "same set when nothing is dropped");
    dataloader_free(&a);
    dataloader_free(&b);
}

static void test_loader_refuses_bad_data(void) {
    DataLoader L;
    char path[PATH_LEN];
    int rc = dataloader_init(&L, tmp_path(path, "nothing_*.bin"), 1, 4, 0, 1, 1, 0, 0, GPT2_VOCAB_SIZE, err, sizeof err);
    CHECK_ERR(rc, err, names_tmp("no data shards match ", "nothing_*.bin"));
    format_path(path, sizeof path, "%s", write_shard("bad_magic.bin", 0, 100, 12345, 1, 100));
    rc = dataloader_init(&L, path, 1, 4, 0, 1, 1, 0, 0, 65536, err, sizeof err);
    CHECK_ERR(rc, err, "bad magic 12345");
    format_path(path, sizeof path, "%s", write_shard("bad_version.bin", 0, 100, SHARD_MAGIC, 3, 100));
    rc = dataloader_init(&L, path, 1, 4, 0, 1, 1, 0, 0, 65536, err, sizeof err);
    CHECK_ERR(rc, err, "unsupported version 3");
    format_path(path, sizeof path, "%s", write_shard("truncated.bin", 0, 90, SHARD_MAGIC, 1, 100));
    rc = dataloader_init(&L, path, 1, 4, 0, 1, 1, 0, 0, 65536, err, sizeof err);
    CHECK_ERR(rc, err, "header says 100 tokens of 2 bytes (1224 bytes) but the file has 1204 bytes");
    format_path(path, sizeof path, "%s", write_shard("range.bin", 50250, 100, SHARD_MAGIC, 1, 100));
    rc = dataloader_init(&L, path, 1, 4, 0, 1, 1, 0, 0, GPT2_VOCAB_SIZE, err, sizeof err);
    CHECK_ERR(rc, err, "token id 50257 at position 7 is outside the vocabulary (size 50257)");
    format_path(path, sizeof path, "%s", write_shard("small.bin", 0, 30, SHARD_MAGIC, 1, 30));
    rc = dataloader_init(&L, path, 4, 8, 0, 1, 4, 0, 0, 65536, err, sizeof err);
    CHECK_ERR(rc, err, "30 tokens make 3 sequences of 8+1 tokens, fewer than one batch of 4 sequences");
    FILE* f = fopenCheck(tmp_path(path, "tiny.bin"), "wb");
    fwrite("abc", 1, 3, f);
    fclose(f);
    rc = dataloader_init(&L, path, 1, 4, 0, 1, 1, 0, 0, 65536, err, sizeof err);
    CHECK_ERR(rc, err, "shorter than the 1024-byte header");
}

// uint32 shards (llm.c's LLaMA-3 format) with ids above 65,535, up to the 2^24 limit: the
// loader hands out exactly the ids in the files, in order (validation) and shuffled.
static void test_loader_reads_uint32_shards(void) {
    const uint32_t firsts[2] = {70000, MAX_VOCAB_SIZE - 600}; // the last id is 2^24 - 1
    write_shard_width("u32_a.bin", 4, firsts[0], 1001, SHARD32_MAGIC, SHARD32_VERSION, 1001); // 100 sequences of 10+1
    write_shard_width("u32_b.bin", 4, firsts[1], 600, SHARD32_MAGIC, SHARD32_VERSION, 600);   // 59 sequences
    char pattern[PATH_LEN];
    format_path(pattern, sizeof pattern, "%s/u32_*.bin", TMP);
    const int T = 10;
    DataLoader L;
    int rc = dataloader_init(&L, pattern, 1, T, 0, 1, 1, 0, 0, MAX_VOCAB_SIZE, err, sizeof err);
    CHECK(rc == 0, "%s", err);
    if (rc) return;
    CHECK(L.token_bytes == 4 && L.num_seqs == 159, "uint32 tokens, 159 sequences (got width %d, %zu)", L.token_bytes, L.num_seqs);
    int exact = 1;
    for (size_t s = 0; s < L.num_seqs; s++) { // validation order: the files' order
        dataloader_next(&L);
        uint32_t first = s < 100 ? firsts[0] + (uint32_t)s * T : firsts[1] + (uint32_t)(s - 100) * T;
        for (int t = 0; t < T; t++) exact &= L.inputs[t] == (int)(first + t) && L.targets[t] == (int)(first + t + 1);
    }
    CHECK(exact, "every sequence holds the file's ids, targets shifted by one");
    dataloader_free(&L);
    // shuffled, 4 sequences a batch: each sequence once in an epoch, ids intact
    rc = dataloader_init(&L, pattern, 4, T, 0, 1, 4, 1, 5, MAX_VOCAB_SIZE, err, sizeof err);
    CHECK(rc == 0, "%s", err);
    if (rc) return;
    int seen[159] = {0}, intact = 1;
    for (size_t k = 0; k < L.seqs_per_epoch / 4; k++) {
        dataloader_next(&L);
        for (int b = 0; b < 4; b++) {
            uint32_t first = (uint32_t)L.inputs[b * T];
            int s = first < firsts[1] ? (int)((first - firsts[0]) / T) : 100 + (int)((first - firsts[1]) / T);
            if (s >= 0 && s < 159) seen[s]++;
            for (int t = 0; t < T; t++) intact &= L.inputs[b * T + t] == (int)(first + t) && L.targets[b * T + t] == (int)(first + t + 1);
        }
    }
    int once = 1, total = 0;
    for (int s = 0; s < 159; s++) { once &= seen[s] <= 1; total += seen[s]; }
    CHECK(intact && once && total == 156, "shuffled: sequences intact, 156 distinct ones (159 rounded down to whole batches), got %d", total);
    dataloader_free(&L);
    // ids past the vocabulary (here the model's 100,000) are refused, naming the file
    format_path(pattern, sizeof pattern, "%s", write_shard_width("bad32_range.bin", 4, 99990, 100, SHARD32_MAGIC, SHARD32_VERSION, 100));
    rc = dataloader_init(&L, pattern, 1, 4, 0, 1, 1, 0, 0, 100000, err, sizeof err);
    CHECK_ERR(rc, err, names_tmp("data shard ", "bad32_range.bin"));
    CHECK_ERR(rc, err, "token id 100000 at position 10 is outside the vocabulary (size 100000)");
}

static void test_loader_refuses_bad_uint32_shards(void) {
    DataLoader L;
    char path[PATH_LEN];
    struct { const char* name; int magic, version, n, count; const char* want; } bad[] = {
        {"bad32_version.bin", SHARD32_MAGIC, 1, 100, 100, "unsupported version 1 (expected 7 with magic 20240801)"},
        {"bad16_version7.bin", SHARD_MAGIC, 7, 100, 100, "unsupported version 7 (expected 1 with magic 20240520)"},
        {"bad32_truncated.bin", SHARD32_MAGIC, 7, 95, 100, "header says 100 tokens of 4 bytes (1424 bytes) but the file has 1404 bytes"},
        {"bad32_long.bin", SHARD32_MAGIC, 7, 100, 50, "header says 50 tokens of 4 bytes (1224 bytes) but the file has 1424 bytes"},
        {"bad32_magic.bin", 20240802, 7, 100, 100, "bad magic 20240802 (expected 20240520 for uint16 tokens or 20240801 for uint32)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        format_path(path, sizeof path, "%s", write_shard_width(bad[i].name, 4, 0, bad[i].n, bad[i].magic, bad[i].version, bad[i].count));
        int rc = dataloader_init(&L, path, 1, 4, 0, 1, 1, 0, 0, MAX_VOCAB_SIZE, err, sizeof err);
        CHECK_ERR(rc, err, names_tmp("data shard ", bad[i].name));
        CHECK_ERR(rc, err, bad[i].want);
    }
    // an id of 2^24 is past every vocabulary
    format_path(path, sizeof path, "%s", write_shard_width("bad32_huge.bin", 4, MAX_VOCAB_SIZE - 5, 100, SHARD32_MAGIC, SHARD32_VERSION, 100));
    int rc = dataloader_init(&L, path, 1, 4, 0, 1, 1, 0, 0, MAX_VOCAB_SIZE, err, sizeof err);
    CHECK_ERR(rc, err, "token id 16777216 at position 5 is outside the vocabulary (size 16777216)");
    // one dataset, one token width
    write_shard_width("mix_a.bin", 2, 0, 100, SHARD_MAGIC, SHARD_VERSION, 100);
    write_shard_width("mix_b.bin", 4, 0, 100, SHARD32_MAGIC, SHARD32_VERSION, 100);
    rc = dataloader_init(&L, tmp_path(path, "mix_*.bin"), 1, 4, 0, 1, 1, 0, 0, 65536, err, sizeof err);
    CHECK_ERR(rc, err, "mixes token widths");
    CHECK_ERR(rc, err, "mix_a.bin' has uint16 tokens");
    CHECK_ERR(rc, err, "mix_b.bin' uint32");
}

// ----------------------------------------------------------------------------
// checkpoint files

// Both architectures' headers round-trip; a parameter count that disagrees with the
// configuration, a wrong size or a truncated file is refused with the file's name.
static void test_model_file_roundtrip_and_truncation(void) {
    ModelConfig llama = llama_config(2, 4, 2, 16, 24, 64, 70000);
    llama.rope_theta = 5e5f; llama.norm_eps = 1e-5f; llama.init_std = 0.01f; llama.bos_token = 1; llama.eos_token = 69999;
    ModelConfig m = gpt2_config(2, 2, 8, 16, 300);
    ModelConfig r;
    size_t rn, ln = model_num_params(&llama);
    char path[PATH_LEN];
    format_path(path, sizeof path, "%s/model.bin", TMP);
    float* lp = (float*)callocCheck(ln, sizeof(float));
    model_file_write(path, &llama, lp, ln);
    CHECK(model_file_config(path, &r, &rn, err, sizeof err) == 0, "%s", err);
    CHECK(memcmp(&r, &llama, sizeof r) == 0 && rn == ln, "LLaMA config round trip");
    model_file_write(path, &llama, lp, ln - 1);
    CHECK_ERR(model_file_config(path, &r, &rn, err, sizeof err), err, "parameters, but its configuration has");
    free(lp);
    size_t n = model_num_params(&m);
    float* p = (float*)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)i * 0.5f - 3.0f;
    model_file_write(path, &m, p, n);
    CHECK(model_file_config(path, &r, &rn, err, sizeof err) == 0, "%s", err);
    CHECK(memcmp(&r, &m, sizeof m) == 0 && rn == n, "config round trip");
    float* q = (float*)mallocCheck(n * sizeof(float));
    CHECK(model_file_read(path, q, n, err, sizeof err) == 0 && memcmp(p, q, n * sizeof(float)) == 0, "weights round trip");
    char want[100];
    snprintf(want, sizeof want, "%zu parameters, the model has %zu", n, n + 1);
    CHECK_ERR(model_file_read(path, q, n + 1, err, sizeof err), err, want);
    CHECK(truncate(path, 1024 + 4 * (off_t)n - 4) == 0, "truncate");
    CHECK_ERR(model_file_config(path, &r, &rn, err, sizeof err), err, "size does not match its header");
    CHECK_ERR(model_file_config(tmp_path(path, "none.bin"), &r, &rn, err, sizeof err), err, names_tmp("", "none.bin"));
    free(p);
    free(q);
}

// Optimizer state saved by 4 ranks loads on 1, 2 and 3 ranks with identical values.
static void test_optimizer_partitions_load_on_any_world_size(void) {
    size_t n = 1001, padded = 1008; // padded to a multiple of 2 * 4
    float *master = (float*)callocCheck(padded, 4), *m = (float*)callocCheck(padded, 4), *v = (float*)callocCheck(padded, 4);
    for (size_t i = 0; i < n; i++) { master[i] = (float)i; m[i] = (float)i * 0.001f; v[i] = (float)i * 1e-6f; }
    char dir[PATH_LEN], tmp[PATH_LEN];
    checkpoint_begin(tmp_path(dir, "ckpt"), 5, tmp, sizeof tmp);
    for (int r = 0; r < 4; r++) {
        size_t off = padded / 4 * r, cnt = padded / 4;
        optim_file_write(tmp, r, 4, off, cnt, n, master + off, m + off, v + off);
    }
    checkpoint_commit(dir, 5, tmp);
    char folder[PATH_LEN];
    CHECK(checkpoint_latest(dir, folder, sizeof folder, err, sizeof err) == 0, "%s", err);
    CHECK(strstr(folder, "step_00000005") != NULL, "latest names step 5: %s", folder);
    for (int world = 1; world <= 3; world++) {
        size_t wpad = (n + 2 * world - 1) / (2 * world) * (2 * world);
        for (int r = 0; r < world; r++) {
            size_t off = wpad / world * r, cnt = wpad / world;
            float *a = (float*)mallocCheck(cnt * 4), *b = (float*)mallocCheck(cnt * 4), *c = (float*)mallocCheck(cnt * 4);
            int rc = optim_files_read(folder, 4, off, cnt, n, a, b, c, err, sizeof err);
            CHECK(rc == 0, "%s", err);
            int same = 1;
            for (size_t i = 0; i < cnt; i++) {
                size_t g = off + i;
                float wm = g < n ? master[g] : 0.0f, wmm = g < n ? m[g] : 0.0f, wv = g < n ? v[g] : 0.0f;
                same &= a[i] == wm && b[i] == wmm && c[i] == wv;
            }
            CHECK(same, "world %d rank %d partition differs", world, r);
            free(a); free(b); free(c);
        }
    }
    // a missing rank file is an error that names it
    char victim[PATH_LEN];
    optim_file_name(victim, sizeof victim, folder, 2, 4);
    unlink(victim);
    float* a = (float*)mallocCheck(padded * 4);
    CHECK_ERR(optim_files_read(folder, 4, 0, padded, n, a, a, a, err, sizeof err), err, "optim_rank0002_of_0004.bin");
    free(a); free(master); free(m); free(v);
}

static void test_checkpoint_commit_keeps_previous_on_crash(void) {
    char dir[PATH_LEN], tmp[PATH_LEN], folder[PATH_LEN];
    float x = 1.0f;
    ModelConfig mc = gpt2_config(1, 1, 4, 4, 10);
    checkpoint_begin(tmp_path(dir, "ck2"), 1, tmp, sizeof tmp);
    char path[PATH_LEN];
    format_path(path, sizeof path, "%s/model.bin", tmp);
    model_file_write(path, &mc, &x, 1);
    checkpoint_commit(dir, 1, tmp);
    // a save of step 2 that "crashes" before its commit: latest still names step 1
    checkpoint_begin(dir, 2, tmp, sizeof tmp);
    format_path(path, sizeof path, "%s/model.bin", tmp);
    model_file_write(path, &mc, &x, 1);
    CHECK(checkpoint_latest(dir, folder, sizeof folder, err, sizeof err) == 0 && strstr(folder, "step_00000001"), "latest: %s", folder);
    // a corrupt latest file is refused
    write_tmp("ck2/latest", "../../etc\n");
    CHECK_ERR(checkpoint_latest(dir, folder, sizeof folder, err, sizeof err), err, "does not name a checkpoint folder");
}

static void test_state_file_roundtrip(void) {
    DSConfig c = fp16_config(0, 16, 1000, 2, 0, 1);
    CheckpointState s, r;
    memset(&s, 0, sizeof s);
    memset(&r, 0, sizeof r);
    train_state_init(&s.train, &c);
    s.train.step = 9; s.train.adam_t = 7; s.train.sched_it = 6; s.train.skipped = 2;
    s.train.scaler.scale = 16384; s.train.scaler.cur_iter = 9; s.train.scaler.last_overflow_iter = 5; s.train.scaler.hyst = 1;
    s.loader_epoch = 3; s.loader_cursor = 96; s.seq_len = 64; s.train_seqs = 1000; s.global_batch = 16; s.world_size = 4; s.seed = 99;
    rng_seed(&s.rng, 5);
    char path[PATH_LEN];
    format_path(path, sizeof path, "%s/state.bin", TMP);
    state_file_write(path, &s);
    CHECK(state_file_read(path, &r, err, sizeof err) == 0, "%s", err);
    CHECK(r.train.step == 9 && r.train.adam_t == 7 && r.train.sched_it == 6 && r.train.skipped == 2, "counters");
    CHECK(r.train.scaler.scale == 16384 && r.train.scaler.cur_iter == 9 && r.train.scaler.last_overflow_iter == 5 && r.train.scaler.hyst == 1, "scaler");
    CHECK(r.loader_epoch == 3 && r.loader_cursor == 96 && r.seq_len == 64 && r.train_seqs == 1000 && r.world_size == 4 && r.seed == 99, "position");
    CHECK(memcmp(r.rng.s, s.rng.s, sizeof s.rng.s) == 0, "rng");
}

// ----------------------------------------------------------------------------
// safetensors and Hugging Face model directories

// Every half and bfloat16 against hand-checked values (normal, subnormal, signed zero,
// infinities, NaN), then exhaustively: each converts to float and back unchanged, and float
// to half rounds to nearest even at every midpoint.
static void test_half_and_bfloat16_conversions_exact(void) {
    struct { uint16_t h; float f; } f16[] = {
        {0x3c00, 1.0f}, {0xc000, -2.0f}, {0x7bff, 65504.0f}, {0x3555, 0.333251953125f}, {0x0400, 6.103515625e-05f}, // 2^-14, smallest normal
        {0x0001, 5.9604644775390625e-08f}, {0x8001, -5.9604644775390625e-08f}, {0x03ff, 6.0975551605224609375e-05f}}; // subnormals: 2^-24, 1023 * 2^-24
    for (size_t i = 0; i < sizeof f16 / sizeof f16[0]; i++) {
        CHECK(f16_to_f32(f16[i].h) == f16[i].f && f32_to_f16(f16[i].f) == f16[i].h, "half 0x%04x: %.10g, expected %.10g", f16[i].h, f16_to_f32(f16[i].h), f16[i].f);
    }
    struct { uint16_t h; float f; } bf16[] = {
        {0x3f80, 1.0f}, {0xc049, -3.140625f}, {0x7f7f, 3.3895313892515355e38f}, {0x0080, 1.1754943508222875e-38f}, // largest, smallest normal
        {0x0001, 9.1835496157991212e-41f}}; // subnormal 2^-133
    for (size_t i = 0; i < sizeof bf16 / sizeof bf16[0]; i++) {
        CHECK(bf16_to_f32(bf16[i].h) == bf16[i].f && f32_to_bf16(bf16[i].f) == bf16[i].h, "bfloat16 0x%04x: %.10g, expected %.10g", bf16[i].h, bf16_to_f32(bf16[i].h), bf16[i].f);
    }
    CHECK(f16_to_f32(0x8000) == 0 && signbit(f16_to_f32(0x8000)) && bf16_to_f32(0x8000) == 0 && signbit(bf16_to_f32(0x8000)), "negative zero");
    CHECK(f32_to_f16(-0.0f) == 0x8000 && f32_to_bf16(-0.0f) == 0x8000, "negative zero back");
    CHECK(f16_to_f32(0x7c00) == INFINITY && f16_to_f32(0xfc00) == -INFINITY && bf16_to_f32(0x7f80) == INFINITY && bf16_to_f32(0xff80) == -INFINITY, "infinities");
    CHECK(isnan(f16_to_f32(0x7e00)) && isnan(f16_to_f32(0x7c01)) && isnan(f16_to_f32(0xfe00)) && isnan(bf16_to_f32(0x7fc0)) && isnan(bf16_to_f32(0xff81)), "NaN");
    CHECK((f32_to_f16(NAN) & 0x7fff) > 0x7c00 && (f32_to_bf16(NAN) & 0x7fff) > 0x7f80, "NaN stays NaN");
    int wrong = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float a = f16_to_f32((uint16_t)h), b = bf16_to_f32((uint16_t)h);
        if (isnan(a) ? !isnan(f16_to_f32(f32_to_f16(a))) : f32_to_f16(a) != h) wrong++;
        if (isnan(b) ? !isnan(bf16_to_f32(f32_to_bf16(b))) : f32_to_bf16(b) != h) wrong++;
    }
    CHECK(wrong == 0, "%d of the 2 x 65536 values do not convert back unchanged", wrong);
    wrong = 0;
    for (uint32_t h = 0; h < 0x7bff; h++) { // neighbours lo < hi, both finite; their midpoint is exact in float
        float lo = f16_to_f32((uint16_t)h), hi = f16_to_f32((uint16_t)(h + 1)), mid = (lo + hi) / 2;
        uint16_t even = (uint16_t)(h & 1 ? h + 1 : h);
        if (f32_to_f16(mid) != even || f32_to_f16(nextafterf(mid, INFINITY)) != h + 1 || f32_to_f16(nextafterf(mid, 0)) != h) wrong++;
        if (f32_to_f16(-mid) != (even | 0x8000)) wrong++;
    }
    CHECK(wrong == 0, "%d half midpoints do not round to nearest even", wrong);
    CHECK(f32_to_f16(65519.996f) == 0x7bff && f32_to_f16(65520.0f) == 0x7c00 && f32_to_f16(1e30f) == 0x7c00 && f32_to_f16(-INFINITY) == 0xfc00, "half overflow");
    CHECK(f32_to_f16(2.98023223876953125e-08f) == 0 && f32_to_f16(nextafterf(2.98023223876953125e-08f, 1)) == 1, "half underflow: 2^-25 rounds to 0 (even)");
    CHECK(f32_to_bf16(1.00390625f) == 0x3f80 && f32_to_bf16(1.01171875f) == 0x3f82 && f32_to_bf16(nextafterf(1.00390625f, 2)) == 0x3f81, "bfloat16 rounds to nearest even");
    CHECK(f32_to_bf16(3.4028234664e38f) == 0x7f80, "bfloat16 overflow rounds to inf");
}

// Writes TMP/name: header_len (0: the header's own length), the header, data_bytes of data.
static void write_st(const char* name, uint64_t header_len, const char* header, const void* data, size_t data_bytes) {
    char path[PATH_LEN];
    FILE* f = fopenCheck(tmp_path(path, name), "wb");
    uint64_t n = header_len ? header_len : strlen(header);
    fwrite(&n, 8, 1, f);
    fwrite(header, 1, strlen(header), f);
    if (data_bytes) fwrite(data, 1, data_bytes, f);
    fclose(f);
}

static int open_st(const char* name) {
    SafeTensors st;
    char path[PATH_LEN];
    err[0] = '\0';
    int rc = safetensors_open(&st, tmp_path(path, name), err, sizeof err);
    if (rc == 0) safetensors_close(&st);
    return rc;
}

// opening TMP/name fails, naming the file, with `want` in the message
#define CHECK_ST_REFUSED(name, want) do { \
    int rc_ = open_st(name); \
    CHECK_ERR(rc_, err, names_tmp("safetensors file ", name)); \
    CHECK_ERR(rc_, err, want); \
} while (0)

// A valid file reads exactly (F32, F16, BF16 at unaligned offsets; I64 recognised, refused
// as weights); every way the reference implementation refuses a file is refused here, by
// file and tensor.
static void test_safetensors_reads_and_validates(void) {
    unsigned char data[34];
    float w[4] = {1.0f, -2.0f, 0.5f, 3.0f};
    uint16_t h[3] = {0x3c00, 0xc000, 0x0001}, b[2] = {0x3f80, 0xc049};
    int64_t step = 7;
    memcpy(data, w, 16); memcpy(data + 16, h, 6); memcpy(data + 22, b, 4); memcpy(data + 26, &step, 8);
    const char* good = "{\"__metadata__\":{\"format\":\"pt\"},\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                       "\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[16,22]},\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[22,26]},"
                       "\"step\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[26,34]}}   ";
    write_st("good.safetensors", 0, good, data, sizeof data);
    SafeTensors st;
    char path[PATH_LEN];
    int rc = safetensors_open(&st, tmp_path(path, "good.safetensors"), err, sizeof err);
    CHECK(rc == 0, "%s", err);
    if (rc == 0) {
        const StTensor *tw = safetensors_find(&st, "w"), *th = safetensors_find(&st, "h"), *tb = safetensors_find(&st, "b"), *ts = safetensors_find(&st, "step");
        CHECK(st.count == 4 && tw && th && tb && ts && tw->ndim == 2 && tw->shape[1] == 2 && ts->ndim == 0 && ts->numel == 1, "tensors");
        float out[4] = {0};
        CHECK(safetensors_read_f32(&st, tw, out, err, sizeof err) == 0 && memcmp(out, w, 16) == 0, "F32 values");
        CHECK(safetensors_read_f32(&st, th, out, err, sizeof err) == 0 && out[0] == 1.0f && out[1] == -2.0f && out[2] == 5.9604644775390625e-08f, "F16 values");
        CHECK(safetensors_read_f32(&st, tb, out, err, sizeof err) == 0 && out[0] == 1.0f && out[1] == -3.140625f, "BF16 values");
        CHECK_ERR(safetensors_read_f32(&st, ts, out, err, sizeof err), err, "'step' has dtype I64; weights must be F32, F16 or BF16");
        CHECK(safetensors_find(&st, "nope") == NULL, "find");
        safetensors_close(&st);
    }
    write_st("huge.st", 100000001, good, data, sizeof data);
    CHECK_ST_REFUSED("huge.st", "header length 100000001 is over the limit of 100000000 bytes");
    write_st("long.st", strlen(good) + sizeof data + 1, good, data, sizeof data);
    CHECK_ST_REFUSED("long.st", "goes beyond the end of the file");
    FILE* f = fopenCheck(tmp_path(path, "tiny.st"), "wb");
    fwrite("abcd", 1, 4, f);
    fclose(f);
    CHECK_ST_REFUSED("tiny.st", "4 bytes, shorter than the 8-byte header length");
    write_st("notjson.st", 0, "{\"w\": {\"dtype\": \"F32\",", NULL, 0);
    CHECK_ST_REFUSED("notjson.st", "the header is not valid JSON: line 1, column 23");
    write_st("array.st", 0, "[1, 2]", NULL, 0);
    CHECK_ST_REFUSED("array.st", "the header must be a JSON object, got an array");
    write_st("dtype.st", 0, "{\"w\":{\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4);
    CHECK_ST_REFUSED("dtype.st", "tensor 'w': unknown dtype \"F17\"");
    write_st("span.st", 0, "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", data, 20);
    CHECK_ST_REFUSED("span.st", "tensor 'w': shape [2, 3] of F32 is 24 bytes, but data_offsets [0, 20] span 20");
    write_st("outside.st", 0, "{\"w\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", data, 12);
    CHECK_ST_REFUSED("outside.st", "tensor 'w': data_offsets [0, 16] go beyond the data section (12 bytes after the header)");
    write_st("overlap.st", 0, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", data, 24);
    CHECK_ST_REFUSED("overlap.st", "tensor 'b' (bytes [8, 24]) overlaps tensor 'a' (bytes [0, 16])");
    write_st("gap.st", 0, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[12,16]}}", data, 16);
    CHECK_ST_REFUSED("gap.st", "bytes [8, 12] of the data section belong to no tensor (a gap before tensor 'b')");
    write_st("trailing.st", 0, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data, 12);
    CHECK_ST_REFUSED("trailing.st", "4 bytes after the last tensor's data belong to no tensor");
    write_st("twice.st", 0, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", data, 8);
    CHECK_ST_REFUSED("twice.st", "duplicate key \"a\"");
    write_st("meta.st", 0, "{\"__metadata__\":{\"step\":1}}", NULL, 0);
    CHECK_ST_REFUSED("meta.st", "\"__metadata__\" must be an object of strings");
    write_st("nooffsets.st", 0, "{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}", data, 4);
    CHECK_ST_REFUSED("nooffsets.st", "tensor 'w': \"data_offsets\" must be [begin, end]");
    write_st("badshape.st", 0, "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", data, 4);
    CHECK_ST_REFUSED("badshape.st", "tensor 'w': shape entries must be non-negative integers");
    CHECK_ST_REFUSED("none.st", "No such file");
}

// The writer: F32 (a transposed matrix), BF16 and F16 (rounded to nearest even), data
// aligned to 8 bytes, read back by the reader; no temporary file left.
static void test_safetensors_writer_round_trip(void) {
    float m[6] = {1, 2, 3, 4, 5, 6}; // (2, 3), stored transposed as (3, 2)
    float v[3] = {0.1f, -0.0f, 65505.0f};
    StWrite t[2] = {{"m.t", 2, {3, 2}, m, 1}, {"v", 1, {3, 0}, v, 0}};
    int dtypes[3] = {ST_F32, ST_BF16, ST_F16};
    char path[PATH_LEN], tmp[PATH_LEN];
    tmp_path(path, "written.safetensors");
    format_path(tmp, sizeof tmp, "%s.tmp", path);
    for (int d = 0; d < 3; d++) {
        int rc = safetensors_write(path, t, 2, dtypes[d], err, sizeof err);
        CHECK(rc == 0, "%s", err);
        SafeTensors st;
        if (rc || safetensors_open(&st, path, err, sizeof err)) { CHECK(0, "%s", err); continue; }
        const StTensor *a = safetensors_find(&st, "m.t"), *b = safetensors_find(&st, "v");
        float got[6], want_m[6] = {1, 4, 2, 5, 3, 6};
        CHECK(a && b && a->dtype == dtypes[d] && a->shape[0] == 3 && a->shape[1] == 2 && b->ndim == 1 && (st.data - st.map) % 8 == 0, "%s: header", ST_DTYPES[dtypes[d]].name);
        CHECK(a && safetensors_read_f32(&st, a, got, err, sizeof err) == 0 && memcmp(got, want_m, sizeof want_m) == 0, "%s: transposed matrix", ST_DTYPES[dtypes[d]].name);
        CHECK(b && safetensors_read_f32(&st, b, got, err, sizeof err) == 0, "%s", err);
        for (int i = 0; i < 3; i++) {
            float want = d == 0 ? v[i] : d == 1 ? bf16_to_f32(f32_to_bf16(v[i])) : f16_to_f32(f32_to_f16(v[i]));
            CHECK(memcmp(&got[i], &want, 4) == 0, "%s: v[%d] = %g, expected %g", ST_DTYPES[dtypes[d]].name, i, got[i], want);
        }
        CHECK(d != 2 || got[2] == 65504.0f, "65505 rounds to the largest half");
        safetensors_close(&st);
    }
    CHECK(file_size(tmp) < 0, "temporary file left");
}

// TMP/name/config.json with the given text; returns the folder.
static const char* hf_dir(const char* name, const char* config) {
    static char dir[PATH_LEN];
    char path[PATH_LEN];
    tmp_path(dir, name);
    make_dirs(dir);
    format_path(path, sizeof path, "%s/config.json", dir);
    FILE* f = fopenCheck(path, "w");
    fputs(config, f);
    fclose(f);
    return dir;
}

#define LLAMA_JSON(extra) "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": 172, " \
    "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"max_position_embeddings\": 128, \"vocab_size\": 300" extra "}"
#define GPT2_JSON(extra) "{\"model_type\": \"gpt2\", \"n_embd\": 64, \"n_layer\": 2, \"n_head\": 4, \"n_positions\": 128, \"vocab_size\": 300, " \
    "\"n_inner\": null" extra "}"

// config.json: LlamaConfig's and GPT2Config's keys and defaults; what dstrain does not
// implement is refused with the file and the key.
static void test_hf_config_reads_and_refuses(void) {
    ModelConfig m;
    const char* d = hf_dir("cfg_llama", LLAMA_JSON(", \"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-05, \"rope_theta\": 500000.0, "
                                                   "\"bos_token_id\": null, \"eos_token_id\": [7, 9], \"pretraining_tp\": 2, \"attention_bias\": false"));
    int rc = hf_config_read(d, &m, err, sizeof err);
    CHECK(rc == 0, "%s", err);
    CHECK(rc == 0 && m.arch == ARCH_LLAMA && m.channels == 64 && m.ffn_hidden == 172 && m.num_layers == 2 && m.num_heads == 4 && m.num_kv_heads == 2
          && m.max_seq_len == 128 && m.vocab_size == 300 && m.padded_vocab_size == 384 && m.norm_eps == 1e-5f && m.rope_theta == 500000.0f
          && !m.tied && m.bos_token == -1 && m.eos_token == 7 && m.init_std == 0.02f, "LLaMA fields");
    d = hf_dir("cfg_llama_defaults", LLAMA_JSON(", \"tie_word_embeddings\": true"));
    rc = hf_config_read(d, &m, err, sizeof err);
    CHECK(rc == 0 && m.num_kv_heads == 4 && m.rope_theta == 10000.0f && m.norm_eps == 1e-6f && m.tied && m.bos_token == 1 && m.eos_token == 2, "LlamaConfig's defaults: %s", err);
    d = hf_dir("cfg_gpt2", GPT2_JSON(""));
    rc = hf_config_read(d, &m, err, sizeof err);
    CHECK(rc == 0 && m.arch == ARCH_GPT2 && m.channels == 64 && m.ffn_hidden == 256 && m.max_seq_len == 128 && m.tied && m.norm_eps == 1e-5f
          && m.bos_token == 50256 && m.eos_token == 50256 && m.padded_vocab_size == 384, "GPT2Config's defaults: %s", err);
    struct { const char* name; const char* json; const char* want; } bad[] = {
        {"attention_bias", LLAMA_JSON(", \"attention_bias\": true"), "key 'attention_bias' is true: biases in the attention projections are not supported"},
        {"mlp_bias", LLAMA_JSON(", \"mlp_bias\": true"), "key 'mlp_bias' is true"},
        {"kv_heads", LLAMA_JSON(", \"num_key_value_heads\": 3"), "key 'num_key_value_heads' (3) must divide 'num_attention_heads' (4)"},
        {"rope_scaling", LLAMA_JSON(", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}"), "key 'rope_scaling' is set: scaled rotary embeddings are not supported yet"},
        {"head_dim", LLAMA_JSON(", \"head_dim\": 32"), "key 'head_dim' is 32, not hidden_size / num_attention_heads = 16"},
        {"hidden_act", LLAMA_JSON(", \"hidden_act\": \"gelu\""), "key 'hidden_act' is \"gelu\": only \"silu\""},
        {"arch", "{\"model_type\": \"llama\", \"architectures\": [\"LlamaForSequenceClassification\"]}", "key 'architectures' is [\"LlamaForSequenceClassification\"]"},
        {"type", "{\"model_type\": \"mistral\"}", "model_type \"mistral\" is not supported (supported: \"llama\""},
        {"no_type", "{\"hidden_size\": 64}", "missing key 'model_type'"},
        {"missing", "{\"model_type\": \"llama\", \"hidden_size\": 64}", "missing key 'intermediate_size'"},
        {"wrong_type", "{\"model_type\": \"llama\", \"hidden_size\": \"64\"}", "key 'hidden_size' must be an integer in 1..65536, got a string"},
        {"eps", LLAMA_JSON(", \"rms_norm_eps\": 2"), "norm epsilon must be in (0, 1), got 2"},
        {"eos", LLAMA_JSON(", \"eos_token_id\": -3"), "key 'eos_token_id' must be a token id"},
        {"n_inner", "{\"model_type\": \"gpt2\", \"n_embd\": 64, \"n_layer\": 2, \"n_head\": 4, \"n_positions\": 128, \"vocab_size\": 300, \"n_inner\": 100}",
         "key 'n_inner' is 100: only null or 4 * n_embd = 256 is supported"},
        {"activation", GPT2_JSON(", \"activation_function\": \"relu\""), "key 'activation_function' is \"relu\""},
        {"untied", GPT2_JSON(", \"tie_word_embeddings\": false"), "key 'tie_word_embeddings' is false"},
        {"layer_idx", GPT2_JSON(", \"scale_attn_by_inverse_layer_idx\": true"), "key 'scale_attn_by_inverse_layer_idx' is true"},
        {"upcast", GPT2_JSON(", \"reorder_and_upcast_attn\": true"), "key 'reorder_and_upcast_attn' is true"},
        {"malformed", "{\"model_type\": llama}", "malformed JSON: line 1, column 16"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[64], file[PATH_LEN + 64];
        snprintf(name, sizeof name, "cfg_%s", bad[i].name);
        d = hf_dir(name, bad[i].json);
        snprintf(file, sizeof file, "'%s/config.json'", d);
        rc = hf_config_read(d, &m, err, sizeof err);
        CHECK_ERR(rc, err, file);
        CHECK_ERR(rc, err, bad[i].want);
    }
}

// Random weights everywhere but the padding rows (zero), as training leaves them.
static float* random_params(const ModelConfig* c, uint64_t seed) {
    size_t n = model_num_params(c);
    float* p = (float*)mallocCheck(n * sizeof(float));
    Rng rng;
    rng_seed(&rng, seed);
    rng_normal_fill(&rng, p, n, 1.0f);
    ParamTable t = param_table(c);
    for (int i = 0; i < t.count; i++) {
        const ParamTensor* x = &t.tensors[i];
        if (x->init_rows) memset(p + x->offset + x->init_rows * c->channels, 0, (x->size - x->init_rows * c->channels) * sizeof(float));
    }
    param_table_free(&t);
    return p;
}

static int same_config(const ModelConfig* a, const ModelConfig* b) {
    return a->arch == b->arch && a->max_seq_len == b->max_seq_len && a->vocab_size == b->vocab_size && a->padded_vocab_size == b->padded_vocab_size
        && a->num_layers == b->num_layers && a->num_heads == b->num_heads && a->num_kv_heads == b->num_kv_heads && a->channels == b->channels
        && a->ffn_hidden == b->ffn_hidden && a->tied == b->tied && a->norm_eps == b->norm_eps && (a->arch == ARCH_GPT2 || a->rope_theta == b->rope_theta)
        && a->init_std == b->init_std && a->bos_token == b->bos_token && a->eos_token == b->eos_token;
}

// hf_write then hf_config_read and hf_weights_read give back the configuration and every
// weight, for both architectures, tied and untied, in one file and in shards.
static void test_hf_write_read_round_trip(void) {
    ModelConfig llama = llama_config(2, 4, 2, 16, 24, 32, 300), tied = llama_config(1, 2, 1, 8, 12, 16, 130), gpt2 = gpt2_config(2, 2, 8, 16, 200);
    llama.norm_eps = 1e-5f; llama.rope_theta = 5e5f; llama.init_std = 0.006f; llama.bos_token = 0; llama.eos_token = 299;
    tied.tied = 1;
    const ModelConfig* cases[3] = {&llama, &tied, &gpt2};
    const char* names[3] = {"hf_llama", "hf_tied", "hf_gpt2"};
    for (int k = 0; k < 3; k++) {
        for (int sharded = 0; sharded < 2; sharded++) {
            char dir[PATH_LEN], index[PATH_LEN];
            format_path(dir, sizeof dir, "%s/%s%s", TMP, names[k], sharded ? "_sharded" : "");
            size_t n = model_num_params(cases[k]);
            float *p = random_params(cases[k], 11 + k), *q = (float*)mallocCheck(n * sizeof(float));
            ModelConfig r;
            int rc = hf_write(dir, cases[k], p, sharded ? 2000 : (size_t)1 << 30, NULL, err, sizeof err);
            CHECK(rc == 0, "%s: %s", dir, err);
            format_path(index, sizeof index, "%s/model.safetensors.index.json", dir);
            CHECK((file_size(index) >= 0) == sharded, "%s: index", dir);
            CHECK(hf_config_read(dir, &r, err, sizeof err) == 0 && same_config(&r, cases[k]), "%s: config: %s", dir, err);
            CHECK(hf_weights_read(dir, cases[k], q, err, sizeof err) == 0 && memcmp(p, q, n * sizeof(float)) == 0, "%s: weights: %s", dir, err);
            free(p);
            free(q);
        }
    }
}

// A file whose every value says where it comes from (tensor * 10000 + element) is read, and
// the flat buffer checked against the layout param_table documents, written out here by
// hand: LLaMA's q/k/v and gate/up stacked in that order, GPT-2's Conv1D weights transposed,
// the padding rows zero. The file lists the tensors in reverse, so order does not matter.
typedef struct { const char* name; int ndim; int64_t rows, cols; } HfSpec;

static float hf_value(int tensor, size_t element) { return (float)tensor * 10000.0f + (float)element; }

static int hf_spec_index(const HfSpec* s, int n, const char* name) {
    for (int i = 0; i < n; i++) if (strcmp(s[i].name, name) == 0) return i;
    return -1;
}

// Writes DIR/model.safetensors of the specs (reversed) and config.json of c; reads it back into p.
static int hf_placed(const char* name, const ModelConfig* c, const HfSpec* s, int n, float* p) {
    float** data = (float**)mallocCheck((size_t)n * sizeof(float*));
    StWrite* w = (StWrite*)mallocCheck((size_t)n * sizeof(StWrite));
    for (int i = 0; i < n; i++) {
        size_t numel = (size_t)s[i].rows * (s[i].ndim == 2 ? (size_t)s[i].cols : 1);
        data[i] = (float*)mallocCheck(numel * sizeof(float));
        for (size_t e = 0; e < numel; e++) data[i][e] = hf_value(i, e);
        StWrite x = {s[i].name, s[i].ndim, {s[i].rows, s[i].cols}, data[i], 0};
        w[n - 1 - i] = x;
    }
    TextBuf config = {NULL, 0, 0};
    hf_config_text(c, &config);
    char dir[PATH_LEN], path[PATH_LEN];
    format_path(dir, sizeof dir, "%s", hf_dir(name, config.s));
    format_path(path, sizeof path, "%s/model.safetensors", dir);
    int rc = safetensors_write(path, w, n, ST_F32, err, sizeof err);
    if (rc == 0) rc = hf_weights_read(dir, c, p, err, sizeof err);
    for (int i = 0; i < n; i++) free(data[i]);
    free(data);
    free(w);
    free(config.s);
    return rc;
}

// n values of p from tensor `name` of the file, starting at its element `from`; 0 if all match
static int hf_misplaced(const float* p, const HfSpec* s, int ns, const char* name, size_t from, size_t n) {
    int t = hf_spec_index(s, ns, name), wrong = 0;
    for (size_t e = 0; e < n; e++) wrong += t < 0 || p[e] != hf_value(t, from + e);
    if (wrong) printf("    %s: %d of %zu values misplaced\n", name, wrong, n);
    return wrong;
}

static void test_hf_names_map_onto_the_parameter_table(void) {
    // LLaMA: C 16, 4 heads of 4, 2 key/value heads (KV = 8), F 24, V 300 (padded 384), 2 layers, untied
    ModelConfig c = llama_config(2, 4, 2, 16, 24, 32, 300);
    HfSpec ls[32] = {{"model.embed_tokens.weight", 2, 300, 16}, {"model.norm.weight", 1, 16, 0}, {"lm_head.weight", 2, 300, 16}};
    int n = 3;
    static char names[2][9][64];
    const char* parts[9] = {"input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
    int64_t shapes[9][3] = {{1, 16, 0}, {2, 16, 16}, {2, 8, 16}, {2, 8, 16}, {2, 16, 16}, {1, 16, 0}, {2, 24, 16}, {2, 24, 16}, {2, 16, 24}};
    for (int l = 0; l < 2; l++) {
        for (int i = 0; i < 9; i++) {
            snprintf(names[l][i], sizeof names[l][i], "model.layers.%d.%s.weight", l, parts[i]);
            HfSpec x = {names[l][i], (int)shapes[i][0], shapes[i][1], shapes[i][2]};
            ls[n++] = x;
        }
    }
    size_t np = model_num_params(&c);
    float* p = (float*)mallocCheck(np * sizeof(float));
    int rc = hf_placed("hf_placed_llama", &c, ls, n, p);
    CHECK(rc == 0, "%s", err);
    ParamTable t = param_table(&c);
    int wrong = 0;
    const float* wte = p + param_named(&t, "wte")->offset;
    const float* head = p + param_named(&t, "lm_head")->offset;
    wrong += hf_misplaced(wte, ls, n, "model.embed_tokens.weight", 0, 300 * 16);
    wrong += hf_misplaced(head, ls, n, "lm_head.weight", 0, 300 * 16);
    for (int e = 300 * 16; e < 384 * 16; e++) wrong += wte[e] != 0 || head[e] != 0;
    wrong += hf_misplaced(p + param_named(&t, "lnfw")->offset, ls, n, "model.norm.weight", 0, 16);
    for (int l = 0; l < 2; l++) {
        const float* qkv = p + param_layer(&t, l, LLAMA_QKVW)->offset;
        const float* fc = p + param_layer(&t, l, LLAMA_FCW)->offset;
        wrong += hf_misplaced(p + param_layer(&t, l, LLAMA_LN1W)->offset, ls, n, names[l][0], 0, 16);
        wrong += hf_misplaced(qkv, ls, n, names[l][1], 0, 16 * 16);            // rows 0..15: q
        wrong += hf_misplaced(qkv + 16 * 16, ls, n, names[l][2], 0, 8 * 16);   // rows 16..23: k
        wrong += hf_misplaced(qkv + 24 * 16, ls, n, names[l][3], 0, 8 * 16);   // rows 24..31: v
        wrong += hf_misplaced(p + param_layer(&t, l, LLAMA_ATTPROJW)->offset, ls, n, names[l][4], 0, 16 * 16);
        wrong += hf_misplaced(p + param_layer(&t, l, LLAMA_LN2W)->offset, ls, n, names[l][5], 0, 16);
        wrong += hf_misplaced(fc, ls, n, names[l][6], 0, 24 * 16);             // rows 0..23: gate
        wrong += hf_misplaced(fc + 24 * 16, ls, n, names[l][7], 0, 24 * 16);   // rows 24..47: up
        wrong += hf_misplaced(p + param_layer(&t, l, LLAMA_FCPROJW)->offset, ls, n, names[l][8], 0, 16 * 24);
    }
    CHECK(rc == 0 && wrong == 0, "LLaMA: %d values misplaced", wrong);
    param_table_free(&t);
    free(p);

    // GPT-2: C 8, 2 heads, maxT 16, V 200 (padded 256), 1 layer; names without "transformer."
    // and Conv1D weights (in, out)
    ModelConfig g = gpt2_config(1, 2, 8, 16, 200);
    HfSpec gs[] = {{"wte.weight", 2, 200, 8}, {"wpe.weight", 2, 16, 8}, {"h.0.ln_1.weight", 1, 8, 0}, {"h.0.ln_1.bias", 1, 8, 0},
                   {"h.0.attn.c_attn.weight", 2, 8, 24}, {"h.0.attn.c_attn.bias", 1, 24, 0}, {"h.0.attn.c_proj.weight", 2, 8, 8},
                   {"h.0.attn.c_proj.bias", 1, 8, 0}, {"h.0.ln_2.weight", 1, 8, 0}, {"h.0.ln_2.bias", 1, 8, 0},
                   {"h.0.mlp.c_fc.weight", 2, 8, 32}, {"h.0.mlp.c_fc.bias", 1, 32, 0}, {"h.0.mlp.c_proj.weight", 2, 32, 8},
                   {"h.0.mlp.c_proj.bias", 1, 8, 0}, {"ln_f.weight", 1, 8, 0}, {"ln_f.bias", 1, 8, 0}, {"h.0.attn.masked_bias", 1, 1, 0}};
    int ng = (int)(sizeof gs / sizeof gs[0]);
    np = model_num_params(&g);
    p = (float*)mallocCheck(np * sizeof(float));
    rc = hf_placed("hf_placed_gpt2", &g, gs, ng, p);
    CHECK(rc == 0, "%s", err);
    t = param_table(&g);
    wrong = 0;
    wte = p + param_named(&t, "wte")->offset;
    wrong += hf_misplaced(wte, gs, ng, "wte.weight", 0, 200 * 8);
    for (int e = 200 * 8; e < 256 * 8; e++) wrong += wte[e] != 0;
    wrong += hf_misplaced(p + param_named(&t, "wpe")->offset, gs, ng, "wpe.weight", 0, 16 * 8);
    const char* direct[][2] = {{"layer0.ln1w", "h.0.ln_1.weight"}, {"layer0.ln1b", "h.0.ln_1.bias"}, {"layer0.qkvb", "h.0.attn.c_attn.bias"},
                               {"layer0.attprojb", "h.0.attn.c_proj.bias"}, {"layer0.ln2w", "h.0.ln_2.weight"}, {"layer0.ln2b", "h.0.ln_2.bias"},
                               {"layer0.fcb", "h.0.mlp.c_fc.bias"}, {"layer0.fcprojb", "h.0.mlp.c_proj.bias"}, {"lnfw", "ln_f.weight"}, {"lnfb", "ln_f.bias"}};
    for (size_t i = 0; i < sizeof direct / sizeof direct[0]; i++) {
        const ParamTensor* x = param_named(&t, direct[i][0]);
        wrong += hf_misplaced(p + x->offset, gs, ng, direct[i][1], 0, x->size);
    }
    const char* conv[][2] = {{"layer0.qkvw", "h.0.attn.c_attn.weight"}, {"layer0.attprojw", "h.0.attn.c_proj.weight"},
                             {"layer0.fcw", "h.0.mlp.c_fc.weight"}, {"layer0.fcprojw", "h.0.mlp.c_proj.weight"}};
    for (size_t i = 0; i < sizeof conv / sizeof conv[0]; i++) { // ours (out, in)[o][k] = the file's (in, out)[k][o]
        const ParamTensor* x = param_named(&t, conv[i][0]);
        int s = hf_spec_index(gs, ng, conv[i][1]);
        size_t in = (size_t)gs[s].rows, out = (size_t)gs[s].cols;
        for (size_t o = 0; o < out; o++) for (size_t k = 0; k < in; k++) wrong += p[x->offset + o * in + k] != hf_value(s, k * out + o);
    }
    CHECK(rc == 0 && wrong == 0, "GPT-2: %d values misplaced", wrong);
    param_table_free(&t);
    free(p);
}

// Weights that do not match config.json are refused by file and tensor: one missing, one of
// another shape; an export never replaces a folder that dstrain did not write.
static void test_hf_weights_refused(void) {
    ModelConfig c = llama_config(2, 4, 2, 16, 24, 32, 300), wide = c;
    wide.ffn_hidden = 32;
    char dir[PATH_LEN], path[PATH_LEN], want[2 * PATH_LEN + 256];
    size_t n = model_num_params(&c);
    float *p = random_params(&c, 3), *q = (float*)mallocCheck(model_num_params(&wide) * sizeof(float));
    // all tensors but one
    HfTensor* t;
    int count = hf_tensors(&c, &t);
    StWrite* w = (StWrite*)mallocCheck((size_t)count * sizeof(StWrite));
    int k = 0;
    for (int i = 0; i < count; i++) {
        if (strcmp(t[i].name, "model.layers.1.mlp.up_proj.weight") == 0) continue;
        StWrite x = {t[i].name, t[i].ndim, {t[i].shape[0], t[i].shape[1]}, p + t[i].offset, 0};
        w[k++] = x;
    }
    TextBuf config = {NULL, 0, 0};
    hf_config_text(&c, &config);
    format_path(dir, sizeof dir, "%s", hf_dir("hf_missing", config.s));
    format_path(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(safetensors_write(path, w, k, ST_F32, err, sizeof err) == 0, "%s", err);
    snprintf(want, sizeof want, "'%s': missing tensor 'model.layers.1.mlp.up_proj.weight' (shape [24, 16])", path);
    CHECK_ERR(hf_weights_read(dir, &c, q, err, sizeof err), err, want);
    // ... and one tensor more, which the model does not have
    StWrite extra = {"model.layers.0.self_attn.q_proj.bias", 1, {16, 0}, p, 0};
    w[k++] = extra;
    CHECK(safetensors_write(path, w, k, ST_F32, err, sizeof err) == 0, "%s", err);
    snprintf(want, sizeof want, "safetensors file '%s': tensor 'model.layers.0.self_attn.q_proj.bias' is not a parameter of the llama model", path);
    CHECK_ERR(hf_weights_read(dir, &c, q, err, sizeof err), err, want);
    // weights of a wider MLP than config.json says
    float* pw = random_params(&wide, 4);
    format_path(dir, sizeof dir, "%s/hf_wide", TMP);
    CHECK(hf_write(dir, &wide, pw, (size_t)1 << 30, NULL, err, sizeof err) == 0, "%s", err);
    format_path(path, sizeof path, "%s/config.json", dir);
    CHECK(write_text(path, config.s, err, sizeof err) == 0, "%s", err);
    ModelConfig r;
    CHECK(hf_config_read(dir, &r, err, sizeof err) == 0 && r.ffn_hidden == 24, "%s", err);
    snprintf(want, sizeof want, "safetensors file '%s/model.safetensors': tensor 'model.layers.0.mlp.gate_proj.weight' has shape [32, 16], but config.json's model needs [24, 16]", dir);
    CHECK_ERR(hf_weights_read(dir, &r, q, err, sizeof err), err, want);
    format_path(dir, sizeof dir, "%s/hf_none", TMP);
    make_dirs(dir);
    CHECK_ERR(hf_weights_read(dir, &c, q, err, sizeof err), err, "no model.safetensors or model.safetensors.index.json");
    // a folder of someone else's files is not replaced; dstrain's own export is
    format_path(path, sizeof path, "%s/notes.txt", dir);
    CHECK(write_text(path, "mine", err, sizeof err) == 0, "%s", err);
    CHECK_ERR(hf_write(dir, &c, p, (size_t)1 << 30, NULL, err, sizeof err), err, "is not empty and not an earlier export of dstrain");
    CHECK(file_size(path) == 4, "the folder's file is untouched");
    format_path(dir, sizeof dir, "%s/hf_wide", TMP);
    CHECK(hf_write(dir, &c, p, (size_t)1 << 30, NULL, err, sizeof err) == 0, "%s", err);
    CHECK(hf_weights_read(dir, &c, q, err, sizeof err) == 0 && memcmp(p, q, n * sizeof(float)) == 0, "an earlier export replaced: %s", err);
    free(config.s);
    free(w);
    free(t);
    free(p);
    free(pw);
    free(q);
}

// ----------------------------------------------------------------------------
// tokenizer

static void test_tokenizer_reads_and_refuses_truncation(void) {
    char path[PATH_LEN];
    format_path(path, sizeof path, "%s/tok.bin", TMP);
    FILE* f = fopenCheck(path, "wb");
    uint32_t header[256] = {TOKENIZER_MAGIC, TOKENIZER_VERSION, 3, 2};
    fwrite(header, sizeof header, 1, f);
    const char* words[] = {"a", "bc", "<|end|>"};
    for (int i = 0; i < 3; i++) { unsigned char n = (unsigned char)strlen(words[i]); fwrite(&n, 1, 1, f); fwrite(words[i], 1, n, f); }
    fclose(f);
    Tokenizer tk;
    CHECK(tokenizer_load(&tk, path, err, sizeof err) == 0, "%s", err);
    CHECK(tk.vocab_size == 3 && tk.eot_token == 2 && strcmp(tokenizer_decode(&tk, 1), "bc") == 0 && strcmp(tokenizer_decode(&tk, 7), "") == 0, "decode");
    tokenizer_free(&tk);
    CHECK(truncate(path, 1024 + 4) == 0, "truncate");
    CHECK_ERR(tokenizer_load(&tk, path, err, sizeof err), err, "truncated at token 1");
    tokenizer_free(&tk);
    // a vocabulary above 65,535 with an empty token and one longer than 255 bytes: both
    // written as a 0 byte and a uint32 length; the others as llm.c writes them
    const int V = 70000;
    f = fopenCheck(path, "wb");
    uint32_t big[256] = {TOKENIZER_MAGIC, TOKENIZER_VERSION, V, 69000};
    fwrite(big, sizeof big, 1, f);
    char long_token[301];
    memset(long_token, 'x', 300);
    long_token[300] = '\0';
    for (int i = 0; i < V; i++) {
        char word[32];
        snprintf(word, sizeof word, "t%d", i);
        const char* bytes = i == 5 ? "" : i == 66000 ? long_token : word;
        uint32_t n = (uint32_t)strlen(bytes);
        unsigned char n8 = n >= 1 && n <= 255 ? (unsigned char)n : 0;
        fwrite(&n8, 1, 1, f);
        if (n8 == 0) fwrite(&n, 4, 1, f);
        fwrite(bytes, 1, n, f);
    }
    fclose(f);
    int loaded = tokenizer_load(&tk, path, err, sizeof err) == 0;
    CHECK(loaded, "%s", err);
    if (loaded) {
        CHECK(tk.vocab_size == V && tk.eot_token == 69000, "vocab %d, start token %d", tk.vocab_size, tk.eot_token);
        CHECK(strcmp(tokenizer_decode(&tk, 5), "") == 0 && strcmp(tokenizer_decode(&tk, 66000), long_token) == 0, "empty and 300-byte tokens");
        CHECK(strcmp(tokenizer_decode(&tk, 4), "t4") == 0 && strcmp(tokenizer_decode(&tk, 69999), "t69999") == 0, "ids above 65,535");
    }
    tokenizer_free(&tk);
    CHECK(truncate(path, 1024 + 5 * 3 + 3) == 0, "truncate"); // in token 5's uint32 length
    CHECK_ERR(tokenizer_load(&tk, path, err, sizeof err), err, "truncated or invalid length at token 5");
    tokenizer_free(&tk);
    big[2] = MAX_VOCAB_SIZE + 1;
    f = fopenCheck(path, "wb");
    fwrite(big, sizeof big, 1, f);
    fclose(f);
    CHECK_ERR(tokenizer_load(&tk, path, err, sizeof err), err, "bad vocab size 16777217 (1..16777216)");
    tokenizer_free(&tk);
    // the real GPT-2 tokenizer, where `make data` wrote it
    if (tokenizer_load(&tk, "data/gpt2_tokenizer.bin", err, sizeof err) == 0) {
        CHECK(tk.vocab_size == GPT2_VOCAB_SIZE && tk.eot_token == GPT2_VOCAB_SIZE - 1 && strcmp(tokenizer_decode(&tk, 50256), "<|endoftext|>") == 0, "GPT-2 EOT");
        CHECK(strcmp(tokenizer_decode(&tk, 464), "The") == 0, "token 464 is 'The', got '%s'", tokenizer_decode(&tk, 464));
        tokenizer_free(&tk);
    }
}

// ----------------------------------------------------------------------------
// launching: launcher variables and the TCP rendezvous (on loopback, 4 processes)

#include <sys/wait.h>

static void test_launch_env_torchrun_and_slurm(void) {
    LaunchEnv e;
    unsetenv("RANK"); unsetenv("WORLD_SIZE"); unsetenv("LOCAL_RANK");
    unsetenv("SLURM_PROCID"); unsetenv("SLURM_NTASKS"); unsetenv("SLURM_LOCALID");
    CHECK(launch_env(&e, err, sizeof err) == 0, "no launcher");
    setenv("SLURM_PROCID", "5", 1); setenv("SLURM_NTASKS", "8", 1); setenv("SLURM_LOCALID", "1", 1);
    CHECK(launch_env(&e, err, sizeof err) == 1 && e.rank == 5 && e.world_size == 8 && e.local_rank == 1 && strcmp(e.source, "Slurm") == 0, "Slurm");
    setenv("RANK", "2", 1); setenv("WORLD_SIZE", "4", 1); setenv("LOCAL_RANK", "2", 1);
    CHECK(launch_env(&e, err, sizeof err) == 1 && e.rank == 2 && e.world_size == 4 && e.local_rank == 2, "torchrun first");
    setenv("RANK", "4", 1);
    CHECK_ERR(launch_env(&e, err, sizeof err), err, "RANK=4, WORLD_SIZE=4: not a valid rank and world size");
    unsetenv("RANK"); unsetenv("WORLD_SIZE"); unsetenv("LOCAL_RANK");
    unsetenv("SLURM_PROCID"); unsetenv("SLURM_NTASKS"); unsetenv("SLURM_LOCALID");
}

static void test_tcp_rendezvous_reaches_every_rank(void) {
    char port[16];
    snprintf(port, sizeof port, "%d", 20000 + getpid() % 20000);
    const int world = 4;
    unsigned char id[128];
    for (int i = 0; i < 128; i++) id[i] = (unsigned char)(i * 7 + 3);
    pid_t kids[world];
    for (int r = 1; r < world; r++) {
        kids[r] = fork();
        if (kids[r] == 0) { // rank r: receive and check
            unsigned char got[128] = {0};
            char e[256];
            int rc = tcp_broadcast(got, sizeof got, r, world, "127.0.0.1", port, 20, e, sizeof e);
            _exit(rc == 0 && memcmp(got, id, sizeof id) == 0 ? 0 : 1);
        }
    }
    int rc = tcp_broadcast(id, sizeof id, 0, world, "127.0.0.1", port, 20, err, sizeof err);
    CHECK(rc == 0, "rank 0: %s", err);
    for (int r = 1; r < world; r++) {
        int status = 0;
        waitpid(kids[r], &status, 0);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rank %d did not receive the id", r);
    }
    // nobody listening: a clear error within the timeout, not a hang
    double t0 = wall_seconds();
    unsigned char got[16];
    snprintf(port, sizeof port, "%d", 40000 + getpid() % 20000);
    rc = tcp_broadcast(got, sizeof got, 1, 2, "127.0.0.1", port, 1, err, sizeof err);
    CHECK_ERR(rc, err, "rendezvous: rank 1 could not reach rank 0 at 127.0.0.1");
    CHECK(wall_seconds() - t0 < 5, "gave up in %.1f s", wall_seconds() - t0);
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR (a folder for the files the tests write, with DIR/sched from tests/schedule_reference.py)\n", argv[0]);
        return 2;
    }
    TMP = argv[1];
    make_dirs(TMP);
    RUN(test_sample_config_loads_unchanged);
    RUN(test_malformed_json_names_line_and_column);
    RUN(test_wrong_types_name_the_key);
    RUN(test_invalid_values_are_refused);
    RUN(test_batch_table);
    RUN(test_schedules_match_reference);
    RUN(test_scaler_defaults_first_overflow_spends_hysteresis);
    RUN(test_scaler_window_growth_on_1001st_clean_step);
    RUN(test_scaler_hysteresis_refills_only_on_growth);
    RUN(test_scaler_consecutive_hysteresis);
    RUN(test_scaler_minimum_floor_and_fatal);
    RUN(test_scaler_static_scale);
    RUN(test_step_plan_skip_and_clip);
    RUN(test_loader_epoch_covers_each_sequence_once_and_ranks_are_disjoint);
    RUN(test_loader_step_contents_independent_of_split);
    RUN(test_loader_seek_resumes_and_epochs_reshuffle);
    RUN(test_loader_refuses_bad_data);
    RUN(test_loader_reads_uint32_shards);
    RUN(test_loader_refuses_bad_uint32_shards);
    RUN(test_model_file_roundtrip_and_truncation);
    RUN(test_optimizer_partitions_load_on_any_world_size);
    RUN(test_checkpoint_commit_keeps_previous_on_crash);
    RUN(test_state_file_roundtrip);
    RUN(test_half_and_bfloat16_conversions_exact);
    RUN(test_safetensors_reads_and_validates);
    RUN(test_safetensors_writer_round_trip);
    RUN(test_hf_config_reads_and_refuses);
    RUN(test_hf_write_read_round_trip);
    RUN(test_hf_names_map_onto_the_parameter_table);
    RUN(test_hf_weights_refused);
    RUN(test_tokenizer_reads_and_refuses_truncation);
    RUN(test_launch_env_torchrun_and_slurm);
    RUN(test_tcp_rendezvous_reaches_every_rank);
    return test_summary();
}
