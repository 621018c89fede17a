/*
test_dstrain.c: tests of the shared runtime (dstrain.h) that need no model: config
reading and validation, DeepSpeed's batch rules, LR schedules against an independent
Python implementation, the loss scaler and step logic against traces worked out from
DeepSpeed's algorithm, the data loader, checkpoint files and the tokenizer.

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
    RUN(test_tokenizer_reads_and_refuses_truncation);
    RUN(test_launch_env_torchrun_and_slurm);
    RUN(test_tcp_rendezvous_reaches_every_rank);
    return test_summary();
}
