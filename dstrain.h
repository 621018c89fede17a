/*
dstrain.h: the runtime shared by the CPU trainer (train_gpt.c) and the GPU trainer
(train_gpt.cu): everything a trainer needs that is not model math, written once. Plain C,
header-only: include it in exactly one translation unit (its functions are not static, as
in llm.c, so a program that uses a part of it compiles without unused-function warnings).

It reads top to bottom: the utilities, then four parts. Every section starts with a rule
and its name, so searching for "// ds_config:" (say) jumps to it.

    utilities ........ fatal, fail, mallocCheck, fopenCheck, fread_check, format_path,
                       wall_seconds, Rng, read_text_file
  PART 1: DeepSpeed semantics (doc/deepspeed.md)
    ds_config ........ DSConfig: every key with its default; ds_config_load, ds_config_validate
    batch ............ ds_resolve_batch: train batch = micro batch x accumulation x ranks
    schedules ........ lr_at: WarmupLR, WarmupDecayLR, WarmupCosineLR, constant
    loss scaler ...... LossScaler: dynamic and static fp16 loss scaling, hysteresis
    step logic ....... TrainState, StepPlan: overflow skip, clipping, Adam's step, schedule step
    communication .... Comm: the collectives ZeRO needs, and the single-rank backend
    ZeRO ............. BufferOps, GradSink, Zero: stages 0/1/2, partitions, gradient buckets
  PART 2: files
    model config ..... ModelConfig (GPT-2, LLaMA), ParamTable (param_table, param_named,
                       param_layer), model_init_params
    tokens ........... TokenShard: llm.c's token shards
    data loader ...... DataLoader: seeded epochs, disjoint ranks, resumable, OpenMP copies
    tokenizer ........ Tokenizer: decode only, llm.c's format
    checkpoints ...... model, optimizer and state files; atomic save; checkpoint_latest
    safetensors ...... SafeTensors: safetensors_open (validated, mmap'ed), safetensors_read_f32,
                       safetensors_write; f16/bf16 <-> f32
    hugging face ..... hf_config_read, hf_weights_read, hf_write: config.json, safetensors
                       (sharded with an index), tokenizer files; hf_tensors maps the names
    logging .......... Logger, StepLog: a line per step, and the same as JSON lines;
                       RankReport: each rank's memory and utilisation at the end
  PART 3: plumbing
    json ............. json_parse: a JSON reader whose errors give line and column
    command line ..... Options, parse_args, load_effective_config, print_config
    mpi .............. comm_init_mpi: the MPI backend (host buffers), waits with a timeout
    launchers ........ launch_env, tcp_broadcast, launcher_world_size, comm_init_host:
                       mpirun, torchrun, the DeepSpeed launcher, Slurm
  PART 4: the training driver
    training driver .. ModelOps (what a trainer supplies), Trainer, train_step, evaluate,
                       save_checkpoint, load_checkpoint, RankUsage and report_ranks,
                       train_main
*/

#ifndef DSTRAIN_H
#define DSTRAIN_H

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// utilities

// A fatal error: message to stderr, non-zero exit. Every message names what is wrong.
void fatal(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

// Formats into an error buffer and returns -1, so validators can `return fail(...)`.
int fail(char* err, size_t errlen, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

void* malloc_check(size_t size, const char* file, int line) {
    void* p = malloc(size ? size : 1);
    if (p == NULL) { fatal("out of memory allocating %zu bytes (%s:%d)", size, file, line); }
    return p;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

void* calloc_check(size_t n, size_t size, const char* file, int line) {
    void* p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) { fatal("out of memory allocating %zu x %zu bytes (%s:%d)", n, size, file, line); }
    return p;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

FILE* fopen_check(const char* path, const char* mode, const char* file, int line) {
    FILE* f = fopen(path, mode);
    if (f == NULL) { fatal("cannot open '%s' (mode %s): %s (%s:%d)", path, mode, strerror(errno), file, line); }
    return f;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

// Reads exactly n items or fails naming the file: a short read means a truncated file.
void fread_check(void* ptr, size_t size, size_t n, FILE* f, const char* path) {
    if (fread(ptr, size, n, f) != n) { fatal("'%s' is truncated or unreadable (wanted %zu bytes more)", path, size * n); }
}

void fwrite_check(const void* ptr, size_t size, size_t n, FILE* f, const char* path) {
    if (fwrite(ptr, size, n, f) != n) { fatal("cannot write '%s': %s", path, strerror(errno)); }
}

// snprintf for paths: a path that does not fit is an error, never silently cut.
void format_path(char* out, size_t n, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(out, n, fmt, ap);
    va_end(ap);
    if (len < 0 || (size_t)len >= n) fatal("path too long (over %zu bytes): %.80s...", n - 1, out);
}
#define PATH_LEN 4096

long long file_size(const char* path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

char* strdup_check(const char* s) {
    char* d = (char*)mallocCheck(strlen(s) + 1);
    strcpy(d, s);
    return d;
}

double wall_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// "1h02m", "3m05s", "12s": for ETAs
void format_duration(double seconds, char* out, size_t n) {
    long s = seconds > 0 ? (long)(seconds + 0.5) : 0;
    if (s >= 3600) { snprintf(out, n, "%ldh%02ldm", s / 3600, (s % 3600) / 60); }
    else if (s >= 60) { snprintf(out, n, "%ldm%02lds", s / 60, s % 60); }
    else { snprintf(out, n, "%lds", s); }
}

// xoshiro256**: small, fast, and its whole state fits in a checkpoint (4 x u64).
typedef struct { uint64_t s[4]; } Rng;

uint64_t rng_splitmix(uint64_t* x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void rng_seed(Rng* r, uint64_t seed) {
    for (int i = 0; i < 4; i++) { r->s[i] = rng_splitmix(&seed); }
}

uint64_t rng_next(Rng* r) {
    uint64_t* s = r->s;
    uint64_t result = s[1] * 5;
    result = ((result << 7) | (result >> 57)) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return result;
}

// uniform in [0, 1) with 24 random bits (exact in float)
float rng_uniform(Rng* r) { return (rng_next(r) >> 40) * (1.0f / 16777216.0f); }

// uniform integer in [0, n) without modulo bias
uint64_t rng_below(Rng* r, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do { x = rng_next(r); } while (x >= limit);
    return x % n;
}

// standard normal samples (Box-Muller, both values used)
void rng_normal_fill(Rng* r, float* out, size_t n, float std) {
    for (size_t i = 0; i < n; i += 2) {
        double u1 = (rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
        double u2 = (rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
        double radius = sqrt(-2.0 * log(1.0 - u1)); // 1 - u1 in (0, 1]: log is finite
        out[i] = (float)(std * radius * cos(2.0 * M_PI * u2));
        if (i + 1 < n) { out[i + 1] = (float)(std * radius * sin(2.0 * M_PI * u2)); }
    }
}

// Reads a whole text file into a NUL-terminated buffer; NULL with err set on failure.
char* read_text_file(const char* path, char* err, size_t errlen) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) { fail(err, errlen, "cannot open '%s': %s", path, strerror(errno)); return NULL; }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (n < 0) { fclose(f); fail(err, errlen, "cannot read '%s'", path); return NULL; }
    char* text = (char*)mallocCheck((size_t)n + 1);
    if (fread(text, 1, (size_t)n, f) != (size_t)n) { fclose(f); free(text); fail(err, errlen, "cannot read '%s'", path); return NULL; }
    fclose(f);
    text[n] = '\0';
    if (strlen(text) != (size_t)n) { free(text); fail(err, errlen, "'%s' contains a NUL byte: not a text file", path); return NULL; }
    return text;
}

// ============================================================================
// PART 1: DeepSpeed semantics
// What a ds_config.json means and what DeepSpeed does with it, step by step, as plain
// functions of their inputs: testable without a model, a file or a second rank.
// ============================================================================

// ----------------------------------------------------------------------------
// ds_config: DeepSpeed's ds_config.json. Keys, defaults and meaning follow DeepSpeed
// (doc/deepspeed.md section 1); a known key with a value of the wrong type is an
// error naming the key, an unknown key is warned about once and ignored.

// The JSON reader of part 3 (plumbing): the values it returns, and its entry points.
typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;

typedef struct JsonValue {
    JsonType type;
    int line, col;           // where the value starts, for error messages
    int boolean;
    double number;
    char* string;
    int count;               // array items or object members
    char** keys;             // object member names
    struct JsonValue* items; // array items or object member values
} JsonValue;

int json_parse(const char* text, JsonValue* out, char* err, size_t errlen);
void json_free(JsonValue* v);
const char* json_type_name(JsonType t);

enum { SCHED_NONE, SCHED_WARMUP_LR, SCHED_WARMUP_DECAY_LR, SCHED_WARMUP_COSINE_LR };
enum { WARMUP_LOG, WARMUP_LINEAR };

typedef struct {
    char path[512];                 // the file it came from ("(defaults)" if none)
    // fp16 / bf16
    int fp16_enabled;               // false
    double fp16_loss_scale;         // 0 = dynamic
    int64_t fp16_initial_scale_power; // 16
    int64_t fp16_loss_scale_window; // 1000
    int64_t fp16_hysteresis;        // 2
    int fp16_consecutive_hysteresis; // false
    double fp16_min_loss_scale;     // 1
    int bf16_enabled;               // false
    // optimizer
    char optimizer_type[32];        // "AdamW"
    double lr;                      // 1e-3
    double betas[2];                // 0.9, 0.999
    double eps;                     // 1e-8
    double weight_decay;            // 0
    int adam_w_mode;                // true: decoupled decay (AdamW), also for type "Adam"
    // scheduler
    int scheduler;                  // SCHED_NONE: constant lr
    char scheduler_type[32];
    double warmup_min_lr;           // 0
    double warmup_max_lr;           // NAN = not given (WarmupLR: optimizer lr; WarmupDecayLR: 0.001)
    int64_t warmup_num_steps;       // 1000
    int64_t total_num_steps;        // required by WarmupDecayLR and WarmupCosineLR
    int warmup_type;                // WARMUP_LOG
    char warmup_type_name[16];
    double warmup_min_ratio;        // 0
    double cos_min_ratio;           // 1e-4
    // clipping
    double gradient_clipping;       // 1.0 (current DeepSpeed); 0 = off
    // ZeRO
    int64_t zero_stage;             // 0
    int64_t reduce_bucket_size;     // 5e8 elements
    int64_t allgather_bucket_size;  // 5e8 elements
    int overlap_comm;               // false
    int contiguous_gradients;       // true
    int reduce_scatter;             // true
    int allgather_partitions;       // true
    // logging
    int64_t steps_per_print;        // 0 = not given: the console prints every step
    int wall_clock_breakdown;       // false
    // batch: -1 = not given; resolved by ds_resolve_batch
    int64_t train_batch_size;
    int64_t micro_batch;            // train_micro_batch_size_per_gpu
    int64_t grad_accum;             // gradient_accumulation_steps
} DSConfig;

void ds_config_defaults(DSConfig* c) {
    memset(c, 0, sizeof(*c));
    strcpy(c->path, "(defaults)");
    c->fp16_initial_scale_power = 16;
    c->fp16_loss_scale_window = 1000;
    c->fp16_hysteresis = 2;
    c->fp16_min_loss_scale = 1.0;
    strcpy(c->optimizer_type, "AdamW");
    c->lr = 1e-3;
    c->betas[0] = 0.9;
    c->betas[1] = 0.999;
    c->eps = 1e-8;
    c->adam_w_mode = 1;
    strcpy(c->scheduler_type, "none");
    c->warmup_max_lr = NAN;
    c->warmup_num_steps = 1000;
    c->total_num_steps = -1;
    strcpy(c->warmup_type_name, "log");
    c->cos_min_ratio = 1e-4;
    c->gradient_clipping = 1.0;
    c->reduce_bucket_size = 500000000;
    c->allgather_bucket_size = 500000000;
    c->contiguous_gradients = 1;
    c->reduce_scatter = 1;
    c->allgather_partitions = 1;
    c->train_batch_size = c->micro_batch = c->grad_accum = -1;
}

typedef enum { KEY_SECTION, KEY_BOOL, KEY_INT, KEY_FLOAT, KEY_STRING, KEY_PAIR } KeyKind;
typedef struct {
    const char* path;
    KeyKind kind;
    size_t offset, size;
    const char* no_effect; // why dstrain ignores a key DeepSpeed has (reported when it is set), or NULL
} ConfigKey;

#define CFG(path, kind, field) {path, kind, offsetof(DSConfig, field), sizeof(((DSConfig*)0)->field), NULL}
#define IGNORED(path, kind, field, why) {path, kind, offsetof(DSConfig, field), sizeof(((DSConfig*)0)->field), why}
static const ConfigKey DS_CONFIG_KEYS[] = {
    {"fp16", KEY_SECTION, 0, 0, NULL},
    CFG("fp16.enabled", KEY_BOOL, fp16_enabled),
    CFG("fp16.loss_scale", KEY_FLOAT, fp16_loss_scale),
    CFG("fp16.initial_scale_power", KEY_INT, fp16_initial_scale_power),
    CFG("fp16.loss_scale_window", KEY_INT, fp16_loss_scale_window),
    CFG("fp16.hysteresis", KEY_INT, fp16_hysteresis),
    CFG("fp16.consecutive_hysteresis", KEY_BOOL, fp16_consecutive_hysteresis),
    CFG("fp16.min_loss_scale", KEY_FLOAT, fp16_min_loss_scale),
    {"bf16", KEY_SECTION, 0, 0, NULL},
    CFG("bf16.enabled", KEY_BOOL, bf16_enabled),
    {"optimizer", KEY_SECTION, 0, 0, NULL},
    CFG("optimizer.type", KEY_STRING, optimizer_type),
    {"optimizer.params", KEY_SECTION, 0, 0, NULL},
    CFG("optimizer.params.lr", KEY_FLOAT, lr),
    CFG("optimizer.params.betas", KEY_PAIR, betas),
    CFG("optimizer.params.eps", KEY_FLOAT, eps),
    CFG("optimizer.params.weight_decay", KEY_FLOAT, weight_decay),
    CFG("optimizer.params.adam_w_mode", KEY_BOOL, adam_w_mode),
    {"scheduler", KEY_SECTION, 0, 0, NULL},
    CFG("scheduler.type", KEY_STRING, scheduler_type),
    {"scheduler.params", KEY_SECTION, 0, 0, NULL},
    CFG("scheduler.params.warmup_min_lr", KEY_FLOAT, warmup_min_lr),
    CFG("scheduler.params.warmup_max_lr", KEY_FLOAT, warmup_max_lr),
    CFG("scheduler.params.warmup_num_steps", KEY_INT, warmup_num_steps),
    CFG("scheduler.params.total_num_steps", KEY_INT, total_num_steps),
    CFG("scheduler.params.warmup_type", KEY_STRING, warmup_type_name),
    CFG("scheduler.params.warmup_min_ratio", KEY_FLOAT, warmup_min_ratio),
    CFG("scheduler.params.cos_min_ratio", KEY_FLOAT, cos_min_ratio),
    CFG("gradient_clipping", KEY_FLOAT, gradient_clipping),
    {"zero_optimization", KEY_SECTION, 0, 0, NULL},
    CFG("zero_optimization.stage", KEY_INT, zero_stage),
    CFG("zero_optimization.reduce_bucket_size", KEY_INT, reduce_bucket_size),
    CFG("zero_optimization.allgather_bucket_size", KEY_INT, allgather_bucket_size),
    CFG("zero_optimization.overlap_comm", KEY_BOOL, overlap_comm),
    IGNORED("zero_optimization.contiguous_gradients", KEY_BOOL, contiguous_gradients,
            "stage 2 always copies gradients into contiguous buckets, as with true"),
    IGNORED("zero_optimization.reduce_scatter", KEY_BOOL, reduce_scatter, "gradients are always reduced with reduce-scatter, as with true"),
    IGNORED("zero_optimization.allgather_partitions", KEY_BOOL, allgather_partitions,
            "updated weights are always shared with all-gather, as with true"),
    CFG("steps_per_print", KEY_INT, steps_per_print),
    CFG("wall_clock_breakdown", KEY_BOOL, wall_clock_breakdown),
    CFG("train_batch_size", KEY_INT, train_batch_size),
    CFG("train_micro_batch_size_per_gpu", KEY_INT, micro_batch),
    CFG("gradient_accumulation_steps", KEY_INT, grad_accum),
};
#undef CFG
#undef IGNORED

const ConfigKey* ds_config_find_key(const char* path) {
    for (size_t i = 0; i < sizeof(DS_CONFIG_KEYS) / sizeof(DS_CONFIG_KEYS[0]); i++) {
        if (strcmp(DS_CONFIG_KEYS[i].path, path) == 0) return &DS_CONFIG_KEYS[i];
    }
    return NULL;
}

// Stores one JSON value into its field, checking the type. null means "use the default".
int ds_config_store(DSConfig* c, const ConfigKey* key, const JsonValue* v, char* err, size_t errlen) {
    char* field = (char*)c + key->offset;
    const char* where = c->path;
    if (v->type == JSON_NULL) return 0;
    switch (key->kind) {
    case KEY_BOOL:
        if (v->type != JSON_BOOL) return fail(err, errlen, "%s:%d:%d: key '%s' must be true or false, got %s", where, v->line, v->col, key->path, json_type_name(v->type));
        *(int*)field = v->boolean;
        return 0;
    case KEY_INT:
        if (v->type != JSON_NUMBER || !isfinite(v->number) || v->number != floor(v->number) || fabs(v->number) > 9.0e15) {
            return fail(err, errlen, "%s:%d:%d: key '%s' must be an integer, got %s", where, v->line, v->col, key->path, v->type == JSON_NUMBER ? "a non-integer number" : json_type_name(v->type));
        }
        *(int64_t*)field = (int64_t)v->number;
        return 0;
    case KEY_FLOAT:
        if (v->type != JSON_NUMBER) return fail(err, errlen, "%s:%d:%d: key '%s' must be a number, got %s", where, v->line, v->col, key->path, json_type_name(v->type));
        *(double*)field = v->number;
        return 0;
    case KEY_STRING:
        if (v->type != JSON_STRING) return fail(err, errlen, "%s:%d:%d: key '%s' must be a string, got %s", where, v->line, v->col, key->path, json_type_name(v->type));
        if (strlen(v->string) >= key->size) return fail(err, errlen, "%s:%d:%d: key '%s': value \"%s\" is too long", where, v->line, v->col, key->path, v->string);
        strcpy(field, v->string);
        return 0;
    case KEY_PAIR:
        if (v->type != JSON_ARRAY || v->count != 2 || v->items[0].type != JSON_NUMBER || v->items[1].type != JSON_NUMBER) {
            return fail(err, errlen, "%s:%d:%d: key '%s' must be an array of two numbers, like [0.9, 0.999]", where, v->line, v->col, key->path);
        }
        ((double*)field)[0] = v->items[0].number;
        ((double*)field)[1] = v->items[1].number;
        return 0;
    case KEY_SECTION:
        break;
    }
    return fail(err, errlen, "internal: key '%s' has no storage", key->path);
}

int ds_config_walk(DSConfig* c, const JsonValue* obj, const char* prefix, char* err, size_t errlen) {
    for (int i = 0; i < obj->count; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s%s%s", prefix, prefix[0] ? "." : "", obj->keys[i]);
        const JsonValue* v = &obj->items[i];
        if (strcmp(path, "optimizer.params.max_grad_norm") == 0) {
            return fail(err, errlen, "%s:%d:%d: key '%s' is not supported: DeepSpeed clips with the top-level key 'gradient_clipping'", c->path, v->line, v->col, path);
        }
        const ConfigKey* key = ds_config_find_key(path);
        if (key == NULL) {
            fprintf(stderr, "warning: %s: unknown key '%s' ignored\n", c->path, path);
            continue;
        }
        if (key->kind == KEY_SECTION) {
            if (v->type == JSON_NULL) continue;
            if (v->type != JSON_OBJECT) return fail(err, errlen, "%s:%d:%d: key '%s' must be an object, got %s", c->path, v->line, v->col, path, json_type_name(v->type));
            if (ds_config_walk(c, v, path, err, errlen)) return -1;
        } else if (ds_config_store(c, key, v, err, errlen)) {
            return -1;
        } else if (key->no_effect) {
            fprintf(stderr, "warning: %s: key '%s' has no effect in dstrain: %s\n", c->path, path, key->no_effect);
        }
    }
    return 0;
}

int str_ieq(const char* a, const char* b) {
    for (; *a && *b; a++, b++) { if (tolower((unsigned char)*a) != tolower((unsigned char)*b)) return 0; }
    return *a == *b;
}

// Checks value ranges and the combinations DeepSpeed refuses. Called after command-line
// overrides, so a bad value from either source is caught with the key's name.
int ds_config_validate(DSConfig* c, char* err, size_t errlen) {
    const char* f = c->path;
    if (c->fp16_enabled && c->bf16_enabled) return fail(err, errlen, "%s: bfloat16 and fp16 modes cannot be simultaneously enabled (fp16.enabled and bf16.enabled are both true)", f);
    if (!(c->fp16_loss_scale >= 0) || isinf(c->fp16_loss_scale)) return fail(err, errlen, "%s: key 'fp16.loss_scale' must be 0 (dynamic) or a positive finite number, got %g", f, c->fp16_loss_scale);
    if (c->fp16_initial_scale_power < 0 || c->fp16_initial_scale_power > 62) return fail(err, errlen, "%s: key 'fp16.initial_scale_power' must be in 0..62, got %lld", f, (long long)c->fp16_initial_scale_power);
    if (c->fp16_loss_scale_window <= 0) return fail(err, errlen, "%s: key 'fp16.loss_scale_window' must be > 0, got %lld", f, (long long)c->fp16_loss_scale_window);
    if (c->fp16_hysteresis < 1) return fail(err, errlen, "%s: key 'fp16.hysteresis' must be >= 1, got %lld", f, (long long)c->fp16_hysteresis);
    if (!(c->fp16_min_loss_scale > 0) || isinf(c->fp16_min_loss_scale)) return fail(err, errlen, "%s: key 'fp16.min_loss_scale' must be > 0, got %g", f, c->fp16_min_loss_scale);
    if (!str_ieq(c->optimizer_type, "Adam") && !str_ieq(c->optimizer_type, "AdamW")) return fail(err, errlen, "%s: key 'optimizer.type': \"%s\" is not supported (use \"Adam\" or \"AdamW\")", f, c->optimizer_type);
    if (!(c->lr >= 0) || isinf(c->lr)) return fail(err, errlen, "%s: key 'optimizer.params.lr' must be >= 0, got %g", f, c->lr);
    for (int i = 0; i < 2; i++) {
        if (!(c->betas[i] >= 0 && c->betas[i] < 1)) return fail(err, errlen, "%s: key 'optimizer.params.betas' must be two numbers in [0, 1), got [%g, %g]", f, c->betas[0], c->betas[1]);
    }
    if (!(c->eps > 0) || isinf(c->eps)) return fail(err, errlen, "%s: key 'optimizer.params.eps' must be > 0, got %g", f, c->eps);
    if (!(c->weight_decay >= 0) || isinf(c->weight_decay)) return fail(err, errlen, "%s: key 'optimizer.params.weight_decay' must be >= 0, got %g", f, c->weight_decay);
    if (!(c->gradient_clipping >= 0) || isinf(c->gradient_clipping)) return fail(err, errlen, "%s: key 'gradient_clipping' must be >= 0 (0 = off), got %g", f, c->gradient_clipping);
    // scheduler
    if (str_ieq(c->scheduler_type, "none")) c->scheduler = SCHED_NONE;
    else if (strcmp(c->scheduler_type, "WarmupLR") == 0) c->scheduler = SCHED_WARMUP_LR;
    else if (strcmp(c->scheduler_type, "WarmupDecayLR") == 0) c->scheduler = SCHED_WARMUP_DECAY_LR;
    else if (strcmp(c->scheduler_type, "WarmupCosineLR") == 0) c->scheduler = SCHED_WARMUP_COSINE_LR;
    else return fail(err, errlen, "%s: key 'scheduler.type': \"%s\" is not supported (use WarmupLR, WarmupDecayLR or WarmupCosineLR)", f, c->scheduler_type);
    if (strcmp(c->warmup_type_name, "log") == 0) c->warmup_type = WARMUP_LOG;
    else if (strcmp(c->warmup_type_name, "linear") == 0) c->warmup_type = WARMUP_LINEAR;
    else return fail(err, errlen, "%s: key 'scheduler.params.warmup_type' must be \"log\" or \"linear\", got \"%s\"", f, c->warmup_type_name);
    if (c->warmup_num_steps < 0) return fail(err, errlen, "%s: key 'scheduler.params.warmup_num_steps' must be >= 0, got %lld", f, (long long)c->warmup_num_steps);
    if ((c->scheduler == SCHED_WARMUP_DECAY_LR || c->scheduler == SCHED_WARMUP_COSINE_LR) && c->total_num_steps <= 0) {
        return fail(err, errlen, "%s: key 'scheduler.params.total_num_steps' is required by %s and must be > 0", f, c->scheduler_type);
    }
    if (!(c->warmup_min_lr >= 0) || isinf(c->warmup_min_lr)) return fail(err, errlen, "%s: key 'scheduler.params.warmup_min_lr' must be >= 0, got %g", f, c->warmup_min_lr);
    if (!isnan(c->warmup_max_lr) && (!(c->warmup_max_lr >= 0) || isinf(c->warmup_max_lr))) return fail(err, errlen, "%s: key 'scheduler.params.warmup_max_lr' must be >= 0, got %g", f, c->warmup_max_lr);
    if (!(c->warmup_min_ratio >= 0 && c->warmup_min_ratio <= 1)) return fail(err, errlen, "%s: key 'scheduler.params.warmup_min_ratio' must be in [0, 1], got %g", f, c->warmup_min_ratio);
    if (!(c->cos_min_ratio >= 0 && c->cos_min_ratio <= 1)) return fail(err, errlen, "%s: key 'scheduler.params.cos_min_ratio' must be in [0, 1], got %g", f, c->cos_min_ratio);
    // ZeRO
    if (c->zero_stage == 3) return fail(err, errlen, "%s: key 'zero_optimization.stage': stage 3 is not supported yet (use 0, 1 or 2)", f);
    if (c->zero_stage < 0 || c->zero_stage > 3) return fail(err, errlen, "%s: key 'zero_optimization.stage' must be 0, 1 or 2, got %lld", f, (long long)c->zero_stage);
    if (c->reduce_bucket_size <= 0) return fail(err, errlen, "%s: key 'zero_optimization.reduce_bucket_size' must be > 0, got %lld", f, (long long)c->reduce_bucket_size);
    if (c->allgather_bucket_size <= 0 || c->allgather_bucket_size % 2) return fail(err, errlen, "%s: key 'zero_optimization.allgather_bucket_size' must be a positive even number, got %lld", f, (long long)c->allgather_bucket_size);
    if (c->steps_per_print < 0) return fail(err, errlen, "%s: key 'steps_per_print' must be >= 0, got %lld", f, (long long)c->steps_per_print);
    return 0;
}

// Loads a ds_config.json over the defaults. Returns 0, or -1 with err naming file, line and key.
int ds_config_load(DSConfig* c, const char* path, char* err, size_t errlen) {
    ds_config_defaults(c);
    snprintf(c->path, sizeof c->path, "%s", path);
    char* text = read_text_file(path, err, errlen);
    if (text == NULL) return -1;
    JsonValue root;
    char jerr[400];
    int rc = json_parse(text, &root, jerr, sizeof jerr);
    free(text);
    if (rc) return fail(err, errlen, "%s: malformed JSON: %s", path, jerr);
    if (root.type != JSON_OBJECT) { json_free(&root); return fail(err, errlen, "%s: the top level must be a JSON object, got %s", path, json_type_name(root.type)); }
    rc = ds_config_walk(c, &root, "", err, errlen);
    json_free(&root);
    return rc;
}

// ----------------------------------------------------------------------------
// batch: DeepSpeed's rules (doc/deepspeed.md section 2) with floor division, then its
// checks in its order, each error saying what to change.

int ds_resolve_batch(DSConfig* c, int world_size, char* err, size_t errlen) {
    int64_t tb = c->train_batch_size, mb = c->micro_batch, ga = c->grad_accum, ws = world_size;
    int has_tb = tb != -1, has_mb = mb != -1, has_ga = ga != -1;
    if (!has_tb && !has_mb) return fail(err, errlen, "%s: Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided", c->path);
    if (has_tb && has_mb && !has_ga) ga = (mb != 0 && ws != 0) ? tb / mb / ws : 0;
    else if (has_tb && !has_mb && has_ga) mb = (ga != 0) ? tb / ws / ga : 0;
    else if (!has_tb && has_mb && has_ga) tb = mb * ga * ws;
    else if (has_tb && !has_mb && !has_ga) { ga = 1; mb = tb / ws; }
    else if (!has_tb && has_mb && !has_ga) { ga = 1; tb = mb * ws; }
    c->train_batch_size = tb; c->micro_batch = mb; c->grad_accum = ga;
    if (tb <= 0) return fail(err, errlen, "%s: Train batch size: %lld has to be greater than 0", c->path, (long long)tb);
    if (mb <= 0) {
        return fail(err, errlen, "%s: Micro batch size per gpu: %lld has to be greater than 0 (with %lld ranks and %lld accumulation steps, train_batch_size must be at least %lld; or lower gradient_accumulation_steps)",
                    c->path, (long long)mb, (long long)ws, (long long)(ga > 0 ? ga : 1), (long long)(ws * (ga > 0 ? ga : 1)));
    }
    if (ga <= 0) {
        return fail(err, errlen, "%s: Gradient accumulation steps: %lld has to be greater than 0 (train_batch_size %lld is smaller than micro batch %lld x %lld ranks = %lld; raise train_batch_size to at least %lld)",
                    c->path, (long long)ga, (long long)tb, (long long)mb, (long long)ws, (long long)(mb * ws), (long long)(mb * ws));
    }
    if (tb != mb * ga * ws) {
        int64_t unit = mb * ws;
        return fail(err, errlen, "%s: Check batch related parameters. train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size %lld != %lld * %lld * %lld (train_batch_size must be a multiple of %lld here, for example %lld)",
                    c->path, (long long)tb, (long long)mb, (long long)ga, (long long)ws, (long long)unit, (long long)(unit * ((tb + unit - 1) / unit)));
    }
    return 0;
}

// ----------------------------------------------------------------------------
// schedules: the learning rate for schedule iteration `it`. DeepSpeed starts a schedule
// at it = -1 and steps it once after every applied optimizer step, so update k uses
// lr_at(k - 1). Formulas: doc/deepspeed.md section 6.

double warmup_gamma(const DSConfig* c, int64_t it, int64_t W) {
    if (c->warmup_type == WARMUP_LOG) return log((double)(it + 1)) / log((double)W);
    return (double)it / (double)W;
}

double lr_at(const DSConfig* c, int64_t it) {
    int64_t W = c->warmup_num_steps > 2 ? c->warmup_num_steps : 2;
    double max_lr = !isnan(c->warmup_max_lr) ? c->warmup_max_lr : (c->scheduler == SCHED_WARMUP_DECAY_LR ? 0.001 : c->lr);
    double min_lr = c->warmup_min_lr;
    switch (c->scheduler) {
    case SCHED_WARMUP_LR:
        if (it < 0) return min_lr;
        return min_lr + (max_lr - min_lr) * (it < W ? warmup_gamma(c, it, W) : 1.0);
    case SCHED_WARMUP_DECAY_LR: {
        if (it < 0) return min_lr;
        if (it < W) return min_lr + (max_lr - min_lr) * warmup_gamma(c, it, W);
        int64_t T = c->total_num_steps;
        double decay = (double)(T - it) / (double)(T - W > 1 ? T - W : 1);
        return min_lr + (max_lr - min_lr) * (decay > 0 ? decay : 0.0);
    }
    case SCHED_WARMUP_COSINE_LR: {
        if (it < 0) return 0.0; // DeepSpeed: "scheduler before it has started" gives 0
        double ratio;
        if (it < W) {
            ratio = c->warmup_min_ratio + warmup_gamma(c, it, W) * (1.0 - c->warmup_min_ratio);
        } else {
            int64_t T = c->total_num_steps;
            double p = (double)(it - W + 1) / (double)(T - W > 1 ? T - W : 1);
            if (p > 1) p = 1;
            ratio = c->cos_min_ratio + (1.0 - c->cos_min_ratio) * (1.0 + cos(M_PI * p)) / 2.0;
            if (ratio < 0) ratio = 0;
        }
        return c->lr * ratio;
    }
    default:
        return c->lr;
    }
}

// ----------------------------------------------------------------------------
// loss scaler: DeepSpeed's dynamic loss scaling (doc/deepspeed.md section 3), and the static
// scale for fp16.loss_scale > 0. Without fp16 the scale is 1 and nothing is skipped.

typedef struct {
    int enabled;                // fp16 on: scale the loss, check gradients for inf/nan
    int dynamic;                // loss_scale == 0
    double scale;               // current scale S
    double min_scale;
    int64_t window;
    int64_t hysteresis;         // configured hysteresis
    int consecutive_hysteresis;
    int64_t cur_iter;           // optimizer steps seen (applied or skipped)
    int64_t last_overflow_iter; // -1 = never
    int64_t hyst;               // overflows still tolerated before the scale halves
} LossScaler;

void loss_scaler_init(LossScaler* s, const DSConfig* c) {
    memset(s, 0, sizeof(*s));
    s->enabled = c->fp16_enabled;
    s->dynamic = c->fp16_enabled && c->fp16_loss_scale == 0;
    s->scale = !c->fp16_enabled ? 1.0 : (s->dynamic ? ldexp(1.0, (int)c->fp16_initial_scale_power) : c->fp16_loss_scale);
    s->min_scale = c->fp16_min_loss_scale;
    s->window = c->fp16_loss_scale_window;
    s->hysteresis = c->fp16_hysteresis;
    s->consecutive_hysteresis = c->fp16_consecutive_hysteresis;
    s->last_overflow_iter = -1;
    s->hyst = c->fp16_hysteresis;
}

// One optimizer step's update of the scale, with the same `overflow` on every rank.
// Returns -1 when the scale is already at its minimum (DeepSpeed's fatal error).
int loss_scaler_update(LossScaler* s, int overflow, int verbose) {
    if (!s->dynamic) { s->cur_iter++; return 0; }
    if (overflow) {
        if (s->hysteresis == 1 || s->hyst == 1) {
            if (s->scale == s->min_scale) return -1;
            double next = s->scale / 2 > s->min_scale ? s->scale / 2 : s->min_scale;
            if (verbose) printf("OVERFLOW! Rank 0 Skipping step. Attempted loss scale: %g, reducing to %g\n", s->scale, next);
            s->scale = next;
        } else {
            if (verbose) printf("OVERFLOW! Rank 0 Skipping step. Attempted loss scale: %g, but hysteresis is %lld. Reducing hysteresis to %lld\n", s->scale, (long long)s->hyst, (long long)(s->hyst - 1));
            s->hyst--;
        }
        s->last_overflow_iter = s->cur_iter;
    } else {
        if (s->consecutive_hysteresis) s->hyst = s->hysteresis;
        int64_t stable = s->cur_iter - s->last_overflow_iter - 1;
        if (stable > 0 && stable % s->window == 0) {
            if (!s->consecutive_hysteresis) s->hyst = s->hysteresis;
            s->scale *= 2;
        }
    }
    s->cur_iter++;
    return 0;
}

// ----------------------------------------------------------------------------
// step logic: what happens after the gradients of an optimizer step are complete
// (doc/deepspeed.md section 4). The trainer measures (overflow, sum of squares of the
// scaled gradients, both already combined over ranks), asks step_plan what to do,
// applies it with its own kernels, then calls step_finish.

typedef struct {
    int64_t step;          // optimizer steps taken, applied or skipped
    int64_t adam_t;        // applied steps: Adam's t (bias correction) after this step
    int64_t sched_it;      // schedule iteration; DeepSpeed starts at -1
    int64_t skipped;       // skipped steps (overflow)
    LossScaler scaler;
} TrainState;

typedef struct {
    int skip;              // overflow: zero the gradients, no optimizer step, no schedule step
    int overflow;
    double scale;          // loss scale used in this step's backward
    double grad_norm;      // true (unscaled) global norm, before clipping
    float grad_factor;     // multiply the gradients by this: 1 / (S * clip factor)
    float lr;
    int64_t adam_t;        // t for this update (1-based)
} StepPlan;

void train_state_init(TrainState* st, const DSConfig* c) {
    memset(st, 0, sizeof(*st));
    st->sched_it = -1;
    loss_scaler_init(&st->scaler, c);
}

StepPlan step_plan(const TrainState* st, const DSConfig* c, int overflow, double scaled_sumsq) {
    StepPlan p;
    memset(&p, 0, sizeof(p));
    p.scale = st->scaler.scale;
    p.overflow = st->scaler.enabled && overflow;
    p.skip = p.overflow;
    p.lr = (float)lr_at(c, st->sched_it); // on a skipped step: the lr that stays in force
    if (p.skip) { p.grad_norm = NAN; return p; }
    double norm = sqrt(scaled_sumsq) / p.scale;
    double combined = p.scale;
    if (c->gradient_clipping > 0) {
        double clip = (norm + 1e-6) / c->gradient_clipping;
        if (clip > 1) combined *= clip;
    }
    p.grad_norm = norm;
    p.grad_factor = (float)(1.0 / combined);
    p.adam_t = st->adam_t + 1;
    return p;
}

// Advances counters, schedule and scaler. Returns -1 if the loss scale cannot go lower.
int step_finish(TrainState* st, const StepPlan* p, int verbose) {
    st->step++;
    if (p->skip) { st->skipped++; }
    else { st->adam_t = p->adam_t; st->sched_it++; }
    return loss_scaler_update(&st->scaler, p->overflow, verbose);
}

// ----------------------------------------------------------------------------
// communication: the handful of collectives ZeRO needs, behind one interface.
// Backends: "single" (one rank, nothing to do), "mpi" (host buffers; built with
// -DUSE_MPI by mpicc), and NCCL for device buffers (in train_gpt.cu). Every rank enters
// every collective in the same order; a wait that exceeds comm->timeout_s ends the run
// with an error naming the collective and the rank, instead of hanging.
// Buffers are float32 (reduce) or raw bytes (all-gather); counts may differ per rank.

#define COMM_MAX_SCALARS 64 // the most doubles one allreduce_f64 takes (the step's statistics are a few)

typedef struct Comm Comm;
struct Comm {
    const char* backend;
    int rank, world_size, local_rank;
    double timeout_s;
    double bytes_sent;     // by this rank since the last reset (ring-algorithm volume), for the log
    void* impl;
    // dst = op(v over ranks), n <= COMM_MAX_SCALARS doubles on the host; op_max: max instead of sum
    void (*allreduce_f64)(Comm* c, double* v, int n, int op_max, const char* what);
    // in place sum of n floats over ranks
    void (*allreduce_f32)(Comm* c, float* buf, size_t n, const char* what);
    // send (sum of counts floats) summed over ranks; rank k receives counts[k] of them in recv.
    // Returns a request to finish with wait (so stage 2 can overlap it with backward).
    void* (*reduce_scatter_start)(Comm* c, const float* send, float* recv, const size_t* counts, const char* what);
    void (*wait)(Comm* c, void* request, const char* what);
    // in place: rank k contributes counts[k] elements of elem_size bytes at displs[k]
    void (*allgather)(Comm* c, void* buf, size_t elem_size, const size_t* counts, const size_t* displs, const char* what);
    void (*barrier)(Comm* c, const char* what);
    void (*finalize)(Comm* c);
};

void single_allreduce_f64(Comm* c, double* v, int n, int op_max, const char* what) { (void)c; (void)v; (void)n; (void)op_max; (void)what; }
void single_allreduce_f32(Comm* c, float* buf, size_t n, const char* what) { (void)c; (void)buf; (void)n; (void)what; }
// one rank has nothing to reduce: ZeRO copies with its buffer operations instead (host or device)
void* single_reduce_scatter_start(Comm* c, const float* send, float* recv, const size_t* counts, const char* what) {
    (void)c; (void)send; (void)recv; (void)counts;
    fatal("internal: %s on a single rank", what);
    return NULL;
}
void single_wait(Comm* c, void* request, const char* what) { (void)c; (void)request; (void)what; }
void single_allgather(Comm* c, void* buf, size_t elem_size, const size_t* counts, const size_t* displs, const char* what) {
    (void)c; (void)buf; (void)elem_size; (void)counts; (void)displs; (void)what;
}
void single_barrier(Comm* c, const char* what) { (void)c; (void)what; }
void single_finalize(Comm* c) { (void)c; }

void comm_init_single(Comm* c) {
    Comm s = {"single", 0, 1, 0, 300.0, 0.0, NULL, single_allreduce_f64, single_allreduce_f32, single_reduce_scatter_start,
              single_wait, single_allgather, single_barrier, single_finalize};
    *c = s;
}

// bytes a rank sends in a ring reduce-scatter or all-gather of `total` bytes; all-reduce is both
double ring_bytes(const Comm* c, double total) { return total * (c->world_size - 1) / c->world_size; }

// ----------------------------------------------------------------------------
// ZeRO: DeepSpeed's stages 0, 1 and 2 (doc/deepspeed.md section 7), written once against
// Comm and BufferOps (host loops on the CPU, kernels on the GPU).
//
// All parameters form one flat buffer padded to a multiple of 2 x ranks; rank k owns the
// contiguous partition [k * n / ws, (k + 1) * n / ws) and keeps the fp32 master weights
// and Adam moments of it (stage 0: every rank keeps everything).
//   stage 0: full gradients accumulate over the micro batches; at the boundary an
//            all-reduce averages them and every rank updates every parameter.
//   stage 1: full gradients accumulate locally; at the boundary a reduce-scatter (in
//            chunks of reduce_bucket_size) gives each rank the averaged gradient of its
//            partition; each rank updates its partition; an all-gather (in chunks of
//            allgather_bucket_size) restores the full weights.
//   stage 2: during every backward pass the model hands over each region of gradients
//            as soon as it is complete (GradSink); they are packed into buckets of
//            reduce_bucket_size elements and each bucket is reduce-scattered at once
//            (with overlap_comm while backward goes on); a rank keeps only its
//            partition's gradient, accumulated over the micro batches.
// The model releases gradient regions from the end of the flat buffer to its start
// (final LayerNorm, last layer, ..., first layer, positions, token embedding), so a
// bucket is always one contiguous range and its reduce-scatter is exact.

typedef struct {
    void* (*alloc)(size_t bytes);                              // zero-filled
    void (*release)(void* p);
    void (*copy)(float* dst, const float* src, size_t n);
    void (*zero)(float* dst, size_t n);
    void (*add_scaled)(float* dst, const float* src, float scale, size_t n); // dst += scale * src
    void (*scale)(float* dst, float s, size_t n);              // dst *= s
    void (*stats)(const float* g, size_t n, int* nonfinite, double* sumsq);
    void (*adamw)(float* master, float* m, float* v, const float* g, size_t n, const StepPlan* p, const DSConfig* c);
    void (*to_host)(float* host_dst, const float* src, size_t n);
    void (*from_host)(float* dst, const float* host_src, size_t n);
} BufferOps;

// Where the model's backward accumulates gradients: region() gives the buffer for the
// parameters [offset, offset + n), done() says they are complete for this micro batch.
typedef struct GradSink GradSink;
struct GradSink {
    float* (*region)(GradSink* s, size_t offset, size_t n);
    void (*done)(GradSink* s, size_t offset, size_t n);
    void* zero;
};

typedef struct {
    int stage;
    Comm* comm;
    const BufferOps* buf;
    size_t num_params, padded;
    size_t* part_count;    // (world) elements each rank owns
    size_t* part_start;    // (world) where each rank's partition starts
    size_t lo, n;          // this rank's partition: [lo, lo + n) (stage 0: everything)
    float* master;         // (n) fp32 master weights
    float* m;              // (n) Adam first moment
    float* v;              // (n) Adam second moment
    float* grads;          // stage 0/1: (padded) full gradients; stage 2: (n) this partition's
    // stage 2
    size_t bucket_size;
    float* bucket[2];      // contiguous_gradients: regions are copied into the bucket being filled
    void* request[2];      // its reduce-scatter
    int in_flight[2];
    float* received[2];    // (max part) this rank's share of a bucket (stage 1: of a chunk, in received[0])
    size_t bucket_hi[2], bucket_lo[2]; // flat range the bucket covers, filled from hi down to lo
    int current;
    float* embedding_grad; // the tied embedding's gradient, held across the backward pass
    float* region_grad;    // the gradient of the region being computed
    size_t embedding_n, region_max;
    GradSink sink;
    int overlap;
    size_t *share_count, *share_displ; // (world) scratch of each collective: nothing is allocated per step
} Zero;

void zero_plan(Zero* z, size_t num_params, int world) {
    z->num_params = num_params;
    size_t unit = 2 * (size_t)world;
    z->padded = (num_params + unit - 1) / unit * unit;
    z->part_count = (size_t*)callocCheck(world, sizeof(size_t));
    z->part_start = (size_t*)callocCheck(world, sizeof(size_t));
    for (int k = 0; k < world; k++) { z->part_start[k] = z->padded / world * k; z->part_count[k] = z->padded / world; }
}

// rank k's share of the flat range [lo, hi)
void zero_shares(const Zero* z, size_t lo, size_t hi, size_t* counts) {
    for (int k = 0; k < z->comm->world_size; k++) {
        size_t a = z->part_start[k], b = a + z->part_count[k];
        a = a > lo ? a : lo;
        b = b < hi ? b : hi;
        counts[k] = b > a ? b - a : 0;
    }
}

// Stage 2: bucket i's buffer holds the flat range [base, base + bucket_size) below bucket_hi.
size_t zero_bucket_base(const Zero* z, int i) { return z->bucket_hi[i] > z->bucket_size ? z->bucket_hi[i] - z->bucket_size : 0; }

// Stage 2: starts the reduce-scatter of bucket i's filled range [bucket_lo, bucket_hi).
void zero_bucket_launch(Zero* z, int i) {
    size_t* counts = z->share_count; // the backends read it before they return
    zero_shares(z, z->bucket_lo[i], z->bucket_hi[i], counts);
    const float* send = z->bucket[i] + (z->bucket_lo[i] - zero_bucket_base(z, i));
    if (z->comm->world_size == 1) { z->buf->copy(z->received[i], send, counts[0]); z->request[i] = NULL; }
    else z->request[i] = z->comm->reduce_scatter_start(z->comm, send, z->received[i], counts, "reduce-scatter of a gradient bucket");
    z->in_flight[i] = 1;
}

// Stage 2: waits for bucket i's reduce-scatter and adds this rank's share, averaged over
// the ranks, to the partition's gradient. The bucket is empty again afterwards.
void zero_bucket_finish(Zero* z, int i) {
    if (!z->in_flight[i]) return;
    if (z->request[i]) z->comm->wait(z->comm, z->request[i], "reduce-scatter of a gradient bucket");
    size_t a = z->lo > z->bucket_lo[i] ? z->lo : z->bucket_lo[i];
    size_t b = z->lo + z->n < z->bucket_hi[i] ? z->lo + z->n : z->bucket_hi[i];
    if (b > a) z->buf->add_scaled(z->grads + (a - z->lo), z->received[i], 1.0f / z->comm->world_size, b - a);
    z->bucket_hi[i] = z->bucket_lo[i] = 0;
    z->in_flight[i] = 0;
}

// Stage 2: the gradients of [offset, offset + n) are complete: copy them into the bucket
// being filled (from its top down); a full bucket is reduce-scattered at once.
void zero_sink_done(GradSink* s, size_t offset, size_t n) {
    Zero* z = (Zero*)s->zero;
    const float* src = offset == 0 && n == z->embedding_n ? z->embedding_grad : z->region_grad;
    size_t hi = offset + n;
    while (hi > offset) {
        int i = z->current;
        if (z->bucket_hi[i] == z->bucket_lo[i]) z->bucket_hi[i] = z->bucket_lo[i] = hi; // a new bucket starts at hi
        if (z->bucket_lo[i] != hi) fatal("internal: gradient regions must be released from the end of the buffer to its start (got [%zu, %zu) after %zu)", offset, offset + n, z->bucket_lo[i]);
        size_t base = zero_bucket_base(z, i);
        size_t lo = offset > base ? offset : base;
        z->buf->copy(z->bucket[i] + (lo - base), src + (lo - offset), hi - lo);
        z->bucket_lo[i] = lo;
        hi = lo;
        if (lo == base) { // full: send it, and make the other buffer free to fill
            zero_bucket_launch(z, i);
            if (!z->overlap) zero_bucket_finish(z, i);
            z->current ^= 1;
            zero_bucket_finish(z, z->current);
        }
    }
}

float* zero_sink_region(GradSink* s, size_t offset, size_t n) {
    Zero* z = (Zero*)s->zero;
    if (z->stage < 2) return z->grads + offset;
    float* dst = offset == 0 && n == z->embedding_n ? z->embedding_grad : z->region_grad;
    if (dst == z->region_grad && n > z->region_max) fatal("internal: gradient region of %zu exceeds the %zu-element buffer", n, z->region_max);
    z->buf->zero(dst, n);
    return dst;
}

void zero_sink_full_done(GradSink* s, size_t offset, size_t n) { (void)s; (void)offset; (void)n; }

// embedding_n: the region held across backward (the tied embedding), region_max: the
// largest other region the model hands over (a layer).
void zero_init(Zero* z, int stage, Comm* comm, const BufferOps* buf, size_t num_params, size_t embedding_n, size_t region_max, const DSConfig* c) {
    memset(z, 0, sizeof(*z));
    z->stage = stage;
    z->comm = comm;
    z->buf = buf;
    zero_plan(z, num_params, comm->world_size);
    z->lo = stage == 0 ? 0 : z->part_start[comm->rank];
    z->n = stage == 0 ? z->padded : z->part_count[comm->rank];
    z->master = (float*)buf->alloc(z->n * sizeof(float));
    z->m = (float*)buf->alloc(z->n * sizeof(float));
    z->v = (float*)buf->alloc(z->n * sizeof(float));
    z->grads = (float*)buf->alloc((stage == 2 ? z->n : z->padded) * sizeof(float));
    z->sink.zero = z;
    z->sink.region = zero_sink_region;
    z->sink.done = stage == 2 ? zero_sink_done : zero_sink_full_done;
    z->bucket_size = (size_t)c->reduce_bucket_size < z->padded ? (size_t)c->reduce_bucket_size : z->padded;
    z->share_count = (size_t*)callocCheck(comm->world_size, sizeof(size_t));
    z->share_displ = (size_t*)callocCheck(comm->world_size, sizeof(size_t));
    if (stage == 1 && comm->world_size > 1) z->received[0] = (float*)buf->alloc(z->n * sizeof(float));
    if (stage == 2) {
        z->overlap = c->overlap_comm;
        for (int i = 0; i < 2; i++) {
            z->bucket[i] = (float*)buf->alloc(z->bucket_size * sizeof(float));
            z->received[i] = (float*)buf->alloc(z->n * sizeof(float));
        }
        z->embedding_n = embedding_n;
        z->region_max = region_max;
        z->embedding_grad = (float*)buf->alloc(embedding_n * sizeof(float));
        z->region_grad = (float*)buf->alloc(region_max * sizeof(float));
    }
}

// Memory of model states on this rank, by buffer (bytes), for the start-up report and tests.
typedef struct { double params, grads, master, moments, buckets, held_grads; } ZeroMemory;

// What a rank holds for `padded` parameters of which it owns n (stage 0: all of them).
ZeroMemory zero_memory_of(int stage, int world, size_t padded, size_t n, size_t bucket_size, size_t embedding_n, size_t region_max, size_t weight_bytes) {
    ZeroMemory m;
    m.params = (double)padded * weight_bytes;
    m.grads = (double)(stage == 2 ? n : padded) * 4;
    m.master = (double)n * 4;
    m.moments = (double)n * 8;
    m.buckets = stage == 2 ? (double)(2 * bucket_size + 2 * n) * 4 : stage == 1 && world > 1 ? (double)n * 4 : 0;
    m.held_grads = stage == 2 ? (double)(embedding_n + region_max) * 4 : 0;
    return m;
}

ZeroMemory zero_memory(const Zero* z, size_t weight_bytes) {
    return zero_memory_of(z->stage, z->comm->world_size, z->padded, z->n, z->bucket_size, z->embedding_n, z->region_max, weight_bytes);
}

void zero_print_memory(const Zero* z, size_t weight_bytes, const char* weight_type) {
    ZeroMemory m = zero_memory(z, weight_bytes);
    int ws = z->comm->world_size;
    double psi = (double)z->padded, MB = 1e6;
    const char* formula[] = {"(w + 4 + 12) Psi: nothing partitioned", "(w + 4) Psi + 12 Psi / N: optimizer states partitioned",
                             "w Psi + (4 + 12) Psi / N: gradients and optimizer states partitioned"};
    printf("ZeRO stage %d on %d rank(s), Psi = %.0f parameters (padded to a multiple of %d), w = %zu bytes per %s weight: %s\n",
           z->stage, ws, psi, 2 * ws, weight_bytes, weight_type, formula[z->stage]);
    printf("  rank %d model states: weights %.1f MB, gradients %.1f MB, fp32 master %.1f MB, Adam moments %.1f MB = %.1f MB\n", z->comm->rank,
           m.params / MB, m.grads / MB, m.master / MB, m.moments / MB, (m.params + m.grads + m.master + m.moments) / MB);
    double fw = (double)weight_bytes, expect = z->stage == 0 ? (fw + 16) * psi : z->stage == 1 ? (fw + 4) * psi + 12 * psi / ws : fw * psi + 16 * psi / ws;
    printf("  formula for stage %d: %.1f MB\n", z->stage, expect / MB);
    if (z->stage == 2) {
        printf("  plus buffers: 2 gradient buckets of %zu elements and their received shares %.1f MB; tied-embedding gradient held across backward %.1f MB; layer gradient %.1f MB\n",
               z->bucket_size, m.buckets / MB, (double)z->embedding_n * 4 / MB, (double)z->region_max * 4 / MB);
    } else if (m.buckets > 0) {
        printf("  plus buffers: this rank's share of the gradients' reduce-scatter %.1f MB\n", m.buckets / MB);
    }
}

// Start of an optimizer step: gradients from zero.
void zero_begin_step(Zero* z) {
    z->buf->zero(z->grads, z->stage == 2 ? z->n : z->padded);
    z->comm->bytes_sent = 0;
}

// After each micro batch's backward (stage 2: the last buckets).
void zero_end_backward(Zero* z) {
    if (z->stage < 2) return;
    int i = z->current;
    if (z->bucket_hi[i] != z->bucket_lo[i] && !z->in_flight[i]) zero_bucket_launch(z, i); // the partly filled last bucket
    zero_bucket_finish(z, 0);
    zero_bucket_finish(z, 1);
}

// At the accumulation boundary: this rank's averaged gradient in z->grads (+ z->lo for stages 0/1).
float* zero_reduce_gradients(Zero* z) {
    Comm* c = z->comm;
    if (z->stage == 2) return z->grads;
    float inv = 1.0f / c->world_size;
    if (z->stage == 0) {
        c->allreduce_f32(c, z->grads, z->padded, "all-reduce of the gradients");
        if (c->world_size > 1) z->buf->scale(z->grads, inv, z->padded);
        return z->grads;
    }
    // stage 1: reduce-scatter in chunks of reduce_bucket_size, each rank's share lands in its partition
    if (c->world_size == 1) return z->grads; // one rank: its gradient is the average
    size_t* counts = z->share_count;
    size_t chunk = z->bucket_size;
    float* mine = z->received[0];
    for (size_t lo = 0; lo < z->padded; lo += chunk) {
        size_t hi = lo + chunk < z->padded ? lo + chunk : z->padded;
        zero_shares(z, lo, hi, counts);
        void* r = c->reduce_scatter_start(c, z->grads + lo, mine, counts, "reduce-scatter of the gradients");
        c->wait(c, r, "reduce-scatter of the gradients");
        size_t a = z->lo > lo ? z->lo : lo, b = z->lo + z->n < hi ? z->lo + z->n : hi;
        if (b > a) z->buf->copy(z->grads + a, mine, b - a);
    }
    z->buf->scale(z->grads + z->lo, inv, z->n);
    return z->grads + z->lo;
}

void zero_free(Zero* z) {
    const BufferOps* b = z->buf;
    b->release(z->master); b->release(z->m); b->release(z->v); b->release(z->grads);
    if (z->stage == 2) {
        for (int i = 0; i < 2; i++) { b->release(z->bucket[i]); b->release(z->received[i]); }
        b->release(z->embedding_grad);
        b->release(z->region_grad);
    }
    if (z->stage == 1 && z->received[0]) b->release(z->received[0]);
    free(z->share_count);
    free(z->share_displ);
    free(z->part_count);
    free(z->part_start);
}

// ============================================================================
// PART 2: files
// What is read and written: the model description that checkpoint headers record,
// token shards and the data loader, the tokenizer, checkpoints, Hugging Face models, logs. Every reader checks
// magic, version and sizes and names the file it refuses.
// ============================================================================

// ----------------------------------------------------------------------------
// model config: the architecture and its sizes, what a checkpoint header records.
// Two architectures share one flat-buffer approach:
//   ARCH_GPT2   learned positions, LayerNorm with biases, GELU (tanh), tied embeddings
//   ARCH_LLAMA  LLaMA as Hugging Face's LlamaForCausalLM defines it (DeepSeek-LLM): RMSNorm,
//               rotary embeddings, grouped-query attention, SwiGLU MLP, no biases, lm_head
//               untied unless tie_word_embeddings

enum { ARCH_GPT2 = 1, ARCH_LLAMA = 2 };
enum { DTYPE_FP32 = 0 }; // checkpoints hold the fp32 master weights
#define GPT2_VOCAB_SIZE 50257 // GPT-2's BPE: 50,000 merges, 256 bytes, <|endoftext|>
#define MAX_VOCAB_SIZE (1 << 24) // token ids are stored as uint32; 16M is far above any real vocabulary

typedef struct {
    int arch;
    int max_seq_len;       // learned positions (GPT-2) / max_position_embeddings (LLaMA)
    int vocab_size;        // real tokens, GPT2_VOCAB_SIZE for GPT-2
    int padded_vocab_size; // rows of the embedding (and lm_head), a multiple of 128
    int num_layers;
    int num_heads;
    int num_kv_heads;      // key/value heads, shared by num_heads / num_kv_heads query heads each; = num_heads for GPT-2
    int channels;
    int ffn_hidden;        // 4 * channels for GPT-2, intermediate_size for LLaMA
    int tied;              // lm_head is the token embedding (always for GPT-2)
    float norm_eps;        // LayerNorm / RMSNorm epsilon
    float rope_theta;      // LLaMA: base of the rotary frequencies
    float init_std;        // initializer_range: std of the normal initialisation
    int bos_token, eos_token; // from the Hugging Face config, -1 if none (written back on export)
} ModelConfig;

const char* arch_name(int arch) { return arch == ARCH_GPT2 ? "gpt2" : arch == ARCH_LLAMA ? "llama" : "unknown"; }

int model_config_check(const ModelConfig* m, char* err, size_t errlen) {
    if (m->arch != ARCH_GPT2 && m->arch != ARCH_LLAMA) return fail(err, errlen, "unknown architecture %d", m->arch);
    if (m->num_layers < 1 || m->num_layers > 1024) return fail(err, errlen, "layers must be in 1..1024, got %d", m->num_layers);
    if (m->num_heads < 1 || m->channels < 1 || m->channels % m->num_heads) return fail(err, errlen, "dim (%d) must be a positive multiple of heads (%d)", m->channels, m->num_heads);
    if (m->channels > 1 << 16) return fail(err, errlen, "dim must be at most %d, got %d", 1 << 16, m->channels);
    if ((m->channels / m->num_heads) % 2 && m->arch == ARCH_LLAMA) return fail(err, errlen, "rotary embeddings need an even head size, got %d", m->channels / m->num_heads);
    if (m->num_kv_heads < 1 || m->num_heads % m->num_kv_heads) return fail(err, errlen, "key/value heads (%d) must divide the heads (%d)", m->num_kv_heads, m->num_heads);
    if (m->max_seq_len < 1 || m->max_seq_len > 1 << 20) return fail(err, errlen, "sequence length must be in 1..%d, got %d", 1 << 20, m->max_seq_len);
    if (m->vocab_size < 1 || m->vocab_size > MAX_VOCAB_SIZE) return fail(err, errlen, "vocab size must be in 1..%d, got %d", MAX_VOCAB_SIZE, m->vocab_size);
    if (m->padded_vocab_size < m->vocab_size || m->padded_vocab_size % 128) return fail(err, errlen, "padded vocab size %d must be a multiple of 128 and >= vocab size %d", m->padded_vocab_size, m->vocab_size);
    if (m->ffn_hidden < 1 || m->ffn_hidden > 1 << 20) return fail(err, errlen, "FFN width must be in 1..%d, got %d", 1 << 20, m->ffn_hidden);
    if (!(m->norm_eps > 0 && m->norm_eps < 1)) return fail(err, errlen, "norm epsilon must be in (0, 1), got %g", m->norm_eps);
    if (!(m->init_std > 0 && m->init_std < 1)) return fail(err, errlen, "initializer_range must be in (0, 1), got %g", m->init_std);
    if (m->arch == ARCH_GPT2) {
        if (m->num_kv_heads != m->num_heads) return fail(err, errlen, "GPT-2 needs num_kv_heads == num_heads (%d != %d)", m->num_kv_heads, m->num_heads);
        if (m->ffn_hidden != 4 * m->channels) return fail(err, errlen, "GPT-2 needs ffn_hidden == 4 * dim (%d != %d)", m->ffn_hidden, 4 * m->channels);
        if (!m->tied) return fail(err, errlen, "GPT-2's output layer is its token embedding (tied)");
        if (m->norm_eps != 1e-5f) return fail(err, errlen, "GPT-2's layer_norm_epsilon must be 1e-5 (the kernels' constant), got %g", m->norm_eps);
    } else if (!(m->rope_theta >= 1 && isfinite(m->rope_theta))) {
        return fail(err, errlen, "rope_theta must be a finite number >= 1, got %g", m->rope_theta);
    }
    return 0;
}

ModelConfig gpt2_config(int layers, int heads, int dim, int seq_len, int vocab_size) {
    ModelConfig m = {ARCH_GPT2, seq_len, vocab_size, (vocab_size + 127) / 128 * 128, layers, heads, heads, dim, 4 * dim,
                     1, 1e-5f, 0.0f, 0.02f, -1, -1};
    return m;
}

// A LLaMA configuration with transformers' LlamaConfig defaults for what is not given
// (rms_norm_eps 1e-6, rope_theta 10000, initializer_range 0.02, untied).
ModelConfig llama_config(int layers, int heads, int kv_heads, int dim, int ffn_hidden, int max_seq_len, int vocab_size) {
    ModelConfig m = {ARCH_LLAMA, max_seq_len, vocab_size, (vocab_size + 127) / 128 * 128, layers, heads, kv_heads, dim, ffn_hidden,
                     0, 1e-6f, 10000.0f, 0.02f, -1, -1};
    return m;
}

// The parameters in one flat buffer, layer by layer (a layer's gradients are contiguous,
// so a ZeRO bucket covers whole layers). Matrices are (out, in) as in PyTorch; hs is the
// head size C / NH, KV = num_kv_heads * hs:
//   GPT-2:  wte (Vp,C), wpe (maxT,C),
//           per layer: ln1w (C), ln1b (C), qkvw (3C,C), qkvb (3C), attprojw (C,C), attprojb (C),
//                      ln2w (C), ln2b (C), fcw (4C,C), fcb (4C), fcprojw (C,4C), fcprojb (C),
//           lnfw (C), lnfb (C)
//   LLaMA:  wte (Vp,C),
//           per layer: ln1w (C), qkvw (C+2KV,C) = [q_proj; k_proj; v_proj], attprojw (C,C),
//                      ln2w (C), fcw (2F,C) = [gate_proj; up_proj], fcprojw (C,F) = down_proj,
//           lnfw (C), lm_head (Vp,C) unless tied
// One table describes it; trainers point into their buffers with it, checkpoints, the
// Hugging Face files and tests name tensors with it, and the initialisation walks it.
// The fused q/k/v and gate/up matrices make one matmul each; the Hugging Face reader and
// writer split them into the separate projections.

enum { GPT2_LN1W, GPT2_LN1B, GPT2_QKVW, GPT2_QKVB, GPT2_ATTPROJW, GPT2_ATTPROJB,
       GPT2_LN2W, GPT2_LN2B, GPT2_FCW, GPT2_FCB, GPT2_FCPROJW, GPT2_FCPROJB, GPT2_LAYER_TENSORS };
enum { LLAMA_LN1W, LLAMA_QKVW, LLAMA_ATTPROJW, LLAMA_LN2W, LLAMA_FCW, LLAMA_FCPROJW, LLAMA_LAYER_TENSORS };
// The trainers point a layer's tensors into GPT-2's slots (LayerWeights); LLaMA's go to these,
// and its bias slots stay empty.
static const int LLAMA_GPT2_SLOT[LLAMA_LAYER_TENSORS] = {GPT2_LN1W, GPT2_QKVW, GPT2_ATTPROJW, GPT2_LN2W, GPT2_FCW, GPT2_FCPROJW};

typedef struct {
    char name[32];
    size_t offset, size;
    float init_std;   // > 0: normal(0, init_std); 0: constant init_value
    float init_value;
    size_t init_rows; // rows initialised (the embedding's padding rows stay 0); 0 = all
} ParamTensor;

// The whole table of a model, in layout order, with named lookups (a tensor by name, a
// layer's tensor by layer and GPT2_* / LLAMA_* index) so that no caller counts positions.
typedef struct {
    ParamTensor* tensors; // count entries, in layout order
    int count;
    int first_layer;      // index of layer 0's first tensor
    int per_layer;        // tensors per layer
    size_t num_params;
} ParamTable;

// One layer's tensors of either architecture: names, sizes, initialisation.
typedef struct { const char* name; size_t size; float std, value; } LayerTensorSpec;

int layer_tensor_specs(const ModelConfig* c, LayerTensorSpec* s) {
    size_t C = c->channels, F = c->ffn_hidden, KV = (size_t)c->num_kv_heads * (C / c->num_heads);
    float std = c->init_std;
    if (c->arch == ARCH_GPT2) {
        float residual_std = std / sqrtf(2.0f * c->num_layers); // GPT-2: residual projections scaled
        LayerTensorSpec g[GPT2_LAYER_TENSORS] = {
            {"ln1w", C, 0, 1}, {"ln1b", C, 0, 0}, {"qkvw", 3 * C * C, std, 0}, {"qkvb", 3 * C, 0, 0},
            {"attprojw", C * C, residual_std, 0}, {"attprojb", C, 0, 0}, {"ln2w", C, 0, 1}, {"ln2b", C, 0, 0},
            {"fcw", F * C, std, 0}, {"fcb", F, 0, 0}, {"fcprojw", C * F, residual_std, 0}, {"fcprojb", C, 0, 0}};
        memcpy(s, g, sizeof g);
        return GPT2_LAYER_TENSORS;
    }
    LayerTensorSpec l[LLAMA_LAYER_TENSORS] = { // transformers' LlamaPreTrainedModel._init_weights
        {"ln1w", C, 0, 1}, {"qkvw", (C + 2 * KV) * C, std, 0}, {"attprojw", C * C, std, 0},
        {"ln2w", C, 0, 1}, {"fcw", 2 * F * C, std, 0}, {"fcprojw", C * F, std, 0}};
    memcpy(s, l, sizeof l);
    return LLAMA_LAYER_TENSORS;
}

// The model's table. Free with param_table_free.
ParamTable param_table(const ModelConfig* c) {
    LayerTensorSpec spec[GPT2_LAYER_TENSORS];
    int per_layer = layer_tensor_specs(c, spec);
    size_t C = c->channels, embedding = (size_t)c->padded_vocab_size * C;
    int gpt2 = c->arch == ARCH_GPT2;
    ParamTable p = {NULL, 0, gpt2 ? 2 : 1, per_layer, 0};
    p.tensors = (ParamTensor*)mallocCheck((4 + (size_t)per_layer * c->num_layers) * sizeof(ParamTensor));
    ParamTensor* out = p.tensors;
    int n = 0;
    size_t off = 0;
    out[n] = (ParamTensor){"wte", off, embedding, c->init_std, 0, (size_t)c->vocab_size}; off += out[n++].size;
    if (gpt2) { out[n] = (ParamTensor){"wpe", off, (size_t)c->max_seq_len * C, c->init_std, 0, 0}; off += out[n++].size; }
    for (int l = 0; l < c->num_layers; l++) {
        for (int i = 0; i < per_layer; i++) {
            out[n] = (ParamTensor){"", off, spec[i].size, spec[i].std, spec[i].value, 0};
            snprintf(out[n].name, sizeof out[n].name, "layer%d.%s", l, spec[i].name);
            off += out[n++].size;
        }
    }
    out[n] = (ParamTensor){"lnfw", off, C, 0, 1, 0}; off += out[n++].size;
    if (gpt2) { out[n] = (ParamTensor){"lnfb", off, C, 0, 0, 0}; off += out[n++].size; }
    if (!c->tied) { out[n] = (ParamTensor){"lm_head", off, embedding, c->init_std, 0, (size_t)c->vocab_size}; off += out[n++].size; }
    p.count = n;
    p.num_params = off;
    return p;
}

void param_table_free(ParamTable* p) { free(p->tensors); p->tensors = NULL; p->count = 0; }

// The tensor called `name` ("wte", "layer0.qkvw", ...), or NULL.
const ParamTensor* param_find(const ParamTable* p, const char* name) {
    for (int i = 0; i < p->count; i++) if (strcmp(p->tensors[i].name, name) == 0) return &p->tensors[i];
    return NULL;
}

// A tensor the architecture always has (a missing one is a bug in the table).
const ParamTensor* param_named(const ParamTable* p, const char* name) {
    const ParamTensor* t = param_find(p, name);
    if (t == NULL) fatal("internal: no parameter tensor named '%s'", name);
    return t;
}

// Layer `layer`'s tensor `which` (GPT2_LN1W ... or LLAMA_LN1W ...).
const ParamTensor* param_layer(const ParamTable* p, int layer, int which) {
    return &p->tensors[p->first_layer + layer * p->per_layer + which];
}

// the widths of a layer's fused products: QKV = (NH + 2 NKV) hs, the [q; k; v] rows (3C for
// GPT-2), and F2 = F (GPT-2) or 2F (LLaMA's [gate; up])
size_t qkv_width(const ModelConfig* c) { return (size_t)(c->num_heads + 2 * c->num_kv_heads) * (c->channels / c->num_heads); }
size_t fc_width(const ModelConfig* c) { return (c->arch == ARCH_LLAMA ? 2 : 1) * (size_t)c->ffn_hidden; }

size_t model_num_params(const ModelConfig* c) {
    ParamTable p = param_table(c);
    size_t total = p.num_params;
    param_table_free(&p);
    return total;
}

// Rotary embeddings (LLaMA): cos, sin (maxT, hs/2) of the angles t * theta^(-2i/hs), each
// rounded as transformers rounds them in fp32 (inv_freq = 1 / theta^(2i/hs), angle =
// t * inv_freq), computed once on the host by both trainers so that they rotate by the same bits.
void rope_tables(float* cos_t, float* sin_t, int maxT, int hs, float theta) {
    int half = hs / 2;
    for (int i = 0; i < half; i++) {
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hs);
        for (int t = 0; t < maxT; t++) {
            float angle = (float)t * inv_freq;
            cos_t[t * half + i] = cosf(angle);
            sin_t[t * half + i] = sinf(angle);
        }
    }
}

// Initialisation from a seed: one RNG stream in layout order, so it does not depend on
// threads or device. Normal(0, init_std) matrices and embeddings (GPT-2: residual
// projections init_std / sqrt(2 * layers)), biases 0, norm weights 1, padding rows 0.
void model_init_params(float* params, const ModelConfig* c, uint64_t seed) {
    ParamTable table = param_table(c);
    Rng rng;
    rng_seed(&rng, seed);
    for (int i = 0; i < table.count; i++) {
        const ParamTensor* t = &table.tensors[i];
        float* p = params + t->offset;
        if (t->init_std > 0) {
            size_t rows_n = t->init_rows ? t->init_rows * c->channels : t->size;
            rng_normal_fill(&rng, p, rows_n, t->init_std);
            memset(p + rows_n, 0, (t->size - rows_n) * sizeof(float));
        } else {
            for (size_t k = 0; k < t->size; k++) p[k] = t->init_value;
        }
    }
    param_table_free(&table);
}

// ----------------------------------------------------------------------------
// tokens: llm.c's two shard formats, memory-mapped, validated on open. Both start with
// int32 header[256] = {magic, version, token count, 0...}; then the tokens:
//   magic 20240520, version 1: uint16 tokens (GPT-2, any vocabulary up to 65,536)
//   magic 20240801, version 7: uint32 tokens (llm.c's LLaMA-3 scripts; larger vocabularies)

#define SHARD_MAGIC 20240520   // uint16 tokens
#define SHARD_VERSION 1
#define SHARD32_MAGIC 20240801 // uint32 tokens
#define SHARD32_VERSION 7
#define SHARD_HEADER_BYTES (256 * sizeof(int32_t))

typedef struct {
    char* path;
    void* map;
    size_t map_bytes;
    const void* tokens;    // num_tokens ids of token_bytes each (uint16 or uint32)
    int token_bytes;       // 2 or 4
    size_t num_tokens;
} TokenShard;

// token i of a shard of either width
uint32_t shard_token(const TokenShard* s, size_t i) {
    return s->token_bytes == 2 ? ((const uint16_t*)s->tokens)[i] : ((const uint32_t*)s->tokens)[i];
}

// Checks a shard's header against its size. Returns the token width (2 or 4), or -1.
int shard_check_header(const int32_t* header, long long bytes, const char* path, char* err, size_t errlen) {
    int width, version;
    if (header[0] == SHARD_MAGIC) { width = 2; version = SHARD_VERSION; }
    else if (header[0] == SHARD32_MAGIC) { width = 4; version = SHARD32_VERSION; }
    else return fail(err, errlen, "data shard '%s': bad magic %d (expected %d for uint16 tokens or %d for uint32): not a token shard", path, header[0], SHARD_MAGIC, SHARD32_MAGIC);
    if (header[1] != version) return fail(err, errlen, "data shard '%s': unsupported version %d (expected %d with magic %d)", path, header[1], version, header[0]);
    if (header[2] <= 0) return fail(err, errlen, "data shard '%s': header says %d tokens", path, header[2]);
    long long expected = (long long)SHARD_HEADER_BYTES + (long long)width * header[2];
    if (expected != bytes) {
        return fail(err, errlen, "data shard '%s': header says %d tokens of %d bytes (%lld bytes) but the file has %lld bytes (truncated?)", path, header[2], width, expected, bytes);
    }
    return width;
}

// Position of the first token id >= vocab_size, or n when there is none (OpenMP: shards
// are read once on open, and a 100M-token shard should not take a second).
size_t shard_first_bad_token(const TokenShard* s, uint32_t vocab_size) {
    size_t n = s->num_tokens, first_bad = n;
    if (s->token_bytes == 2) {
        const uint16_t* t = (const uint16_t*)s->tokens;
        #pragma omp parallel for reduction(min:first_bad)
        for (size_t i = 0; i < n; i++) if (t[i] >= vocab_size && i < first_bad) first_bad = i;
    } else {
        const uint32_t* t = (const uint32_t*)s->tokens;
        #pragma omp parallel for reduction(min:first_bad)
        for (size_t i = 0; i < n; i++) if (t[i] >= vocab_size && i < first_bad) first_bad = i;
    }
    return first_bad;
}

void shard_close(TokenShard* s) {
    if (s->map) munmap(s->map, s->map_bytes);
    free(s->path);
    memset(s, 0, sizeof(*s));
}

int shard_open(TokenShard* s, const char* path, int vocab_size, char* err, size_t errlen) {
    memset(s, 0, sizeof(*s));
    long long bytes = file_size(path);
    if (bytes < 0) return fail(err, errlen, "data shard '%s': %s", path, strerror(errno));
    if (bytes < (long long)SHARD_HEADER_BYTES) return fail(err, errlen, "data shard '%s': %lld bytes, shorter than the 1024-byte header (truncated or not a shard)", path, bytes);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail(err, errlen, "data shard '%s': %s", path, strerror(errno));
    void* map = mmap(NULL, (size_t)bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return fail(err, errlen, "data shard '%s': mmap failed: %s", path, strerror(errno));
    const int32_t* header = (const int32_t*)map;
    int width = shard_check_header(header, bytes, path, err, errlen);
    if (width < 0) { munmap(map, (size_t)bytes); return -1; }
    s->path = strdup_check(path);
    s->map = map;
    s->map_bytes = (size_t)bytes;
    s->tokens = (const char*)map + SHARD_HEADER_BYTES;
    s->token_bytes = width;
    s->num_tokens = (size_t)header[2];
    // every token id must index the model's vocabulary
    size_t bad = shard_first_bad_token(s, (uint32_t)vocab_size);
    if (bad < s->num_tokens) {
        int rc = fail(err, errlen, "data shard '%s': token id %u at position %zu is outside the vocabulary (size %d)", path, shard_token(s, bad), bad, vocab_size);
        shard_close(s);
        return rc;
    }
    return 0;
}

// ----------------------------------------------------------------------------
// data loader: the data is a list of sequences of T+1 tokens (stride T, never crossing
// a shard boundary). Each epoch visits a seeded permutation of them (or the natural
// order for validation). An optimizer step consumes `global_batch` consecutive
// sequences of the order, as ga micro batches of world x B; rank r takes its own B of
// each, so ranks are disjoint and the step's set of sequences is the same for every
// split of the global batch into ranks, micro batches and accumulation steps. The tail
// of an epoch shorter than a global batch is dropped.
// The shards of one dataset all have the same token width (uint16 or uint32): a mix
// means files from two tokenizers or two writers, so it is refused.
// Gathering a micro batch is a copy of B x T tokens from memory-mapped shards: OpenMP
// threads copy its sequences in parallel, and the pages of the next micro batch are
// requested from the kernel ahead of time (madvise), so that disk reads overlap the step
// instead of stalling the next one.

typedef struct {
    int B, T, rank, world;
    size_t global_batch;       // sequences per optimizer step, all ranks
    int num_shards;
    TokenShard* shards;
    int token_bytes;           // of every shard: 2 (uint16) or 4 (uint32)
    size_t* first_seq;         // first global sequence index of each shard (+ total)
    size_t num_seqs;
    size_t seqs_per_epoch;     // num_seqs rounded down to whole global batches
    int shuffle;
    uint64_t seed;
    int64_t epoch;             // position of the next micro batch to hand out
    size_t cursor;             // index into the epoch's order of its first sequence (rank 0)
    uint32_t* perm;            // the order of perm_epoch (shuffle only)
    int64_t perm_epoch;
    int* inputs;               // (B, T) the batch handed out by dataloader_next
    int* targets;              // (B, T)
    double last_wait;          // seconds the last dataloader_next took
} DataLoader;

void dataloader_permute(DataLoader* L, int64_t epoch) {
    if (!L->shuffle || L->perm_epoch == epoch) return;
    for (size_t i = 0; i < L->num_seqs; i++) L->perm[i] = (uint32_t)i;
    Rng rng;
    rng_seed(&rng, L->seed * 0x100000001B3ull + (uint64_t)epoch);
    for (size_t i = L->num_seqs - 1; i > 0; i--) {
        size_t j = (size_t)rng_below(&rng, i + 1);
        uint32_t t = L->perm[i]; L->perm[i] = L->perm[j]; L->perm[j] = t;
    }
    L->perm_epoch = epoch;
}

// the T+1 tokens of sequence `seq` (global index) in their shard, L->token_bytes each
const void* dataloader_sequence(const DataLoader* L, size_t seq) {
    int lo = 0, hi = L->num_shards - 1;
    while (lo < hi) { int mid = (lo + hi + 1) / 2; if (L->first_seq[mid] <= seq) lo = mid; else hi = mid - 1; }
    return (const char*)L->shards[lo].tokens + (seq - L->first_seq[lo]) * (size_t)L->T * L->token_bytes;
}

// the global index of this rank's sequence b of the micro batch at (epoch, cursor)
size_t dataloader_seq_index(DataLoader* L, int64_t epoch, size_t cursor, int b) {
    dataloader_permute(L, epoch);
    size_t k = cursor + (size_t)L->rank * L->B + b;
    return L->shuffle ? L->perm[k] : k;
}

// Copies the micro batch at (epoch, cursor) into inputs/targets (B, T). Sequences are
// independent, so threads copy them in parallel once the batch is big enough to pay for
// the fork (about 64K tokens).
void dataloader_gather(DataLoader* L, int* inputs, int* targets) {
    dataloader_permute(L, L->epoch); // before the threads, which then only read the order
    #pragma omp parallel for if ((size_t)L->B * L->T >= 65536)
    for (int b = 0; b < L->B; b++) {
        const void* seq = dataloader_sequence(L, dataloader_seq_index(L, L->epoch, L->cursor, b));
        int* in = inputs + (size_t)b * L->T;
        int* tg = targets + (size_t)b * L->T;
        if (L->token_bytes == 2) { // one loop per width, so each stays a plain widening copy
            const uint16_t* tok = (const uint16_t*)seq;
            for (int t = 0; t < L->T; t++) { in[t] = tok[t]; tg[t] = tok[t + 1]; }
        } else {
            const uint32_t* tok = (const uint32_t*)seq;
            for (int t = 0; t < L->T; t++) { in[t] = (int)tok[t]; tg[t] = (int)tok[t + 1]; }
        }
    }
}

// Asks the kernel to read the pages of the micro batch at (epoch, cursor) in the
// background (a no-op when they are cached, as they usually are after the first epoch).
void dataloader_advise(DataLoader* L, int64_t epoch, size_t cursor) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int b = 0; b < L->B; b++) {
        uintptr_t start = (uintptr_t)dataloader_sequence(L, dataloader_seq_index(L, epoch, cursor, b));
        uintptr_t end = start + ((size_t)L->T + 1) * L->token_bytes;
        start &= ~(page - 1);
        madvise((void*)start, end - start, MADV_WILLNEED);
    }
}

// Opens every shard matching `pattern` (a glob, sorted). global_batch = sequences per
// optimizer step over all ranks (train) or world * B (validation).
int dataloader_init(DataLoader* L, const char* pattern, int B, int T, int rank, int world, size_t global_batch,
                           int shuffle, uint64_t seed, int vocab_size, char* err, size_t errlen) {
    memset(L, 0, sizeof(*L));
    L->B = B; L->T = T; L->rank = rank; L->world = world;
    L->global_batch = global_batch; L->shuffle = shuffle; L->seed = seed;
    L->perm_epoch = -1;
    glob_t g;
    int grc = glob(pattern, 0, NULL, &g);
    if (grc != 0 || g.gl_pathc == 0) {
        if (grc == 0) globfree(&g);
        return fail(err, errlen, "no data shards match '%s' (prepare data with `make data`, or pass --train-data/--val-data)", pattern);
    }
    L->num_shards = (int)g.gl_pathc;
    L->shards = (TokenShard*)callocCheck(L->num_shards, sizeof(TokenShard));
    L->first_seq = (size_t*)callocCheck(L->num_shards + 1, sizeof(size_t));
    for (int i = 0; i < L->num_shards; i++) {
        if (shard_open(&L->shards[i], g.gl_pathv[i], vocab_size, err, errlen)) { globfree(&g); return -1; }
        if (L->shards[i].token_bytes != L->shards[0].token_bytes) {
            fail(err, errlen, "'%s' mixes token widths: '%s' has %s tokens, '%s' %s (one dataset, one tokenizer: prepare its shards together)",
                 pattern, g.gl_pathv[0], L->shards[0].token_bytes == 2 ? "uint16" : "uint32", g.gl_pathv[i], L->shards[i].token_bytes == 2 ? "uint16" : "uint32");
            globfree(&g);
            return -1;
        }
        size_t seqs = L->shards[i].num_tokens > (size_t)T ? (L->shards[i].num_tokens - 1) / T : 0;
        L->first_seq[i + 1] = L->first_seq[i] + seqs;
    }
    globfree(&g);
    L->token_bytes = L->shards[0].token_bytes;
    L->num_seqs = L->first_seq[L->num_shards];
    L->seqs_per_epoch = L->num_seqs / global_batch * global_batch;
    if (L->seqs_per_epoch == 0) {
        size_t tokens = 0;
        for (int i = 0; i < L->num_shards; i++) tokens += L->shards[i].num_tokens;
        return fail(err, errlen, "'%s': %zu tokens make %zu sequences of %d+1 tokens, fewer than one batch of %zu sequences", pattern, tokens, L->num_seqs, T, global_batch);
    }
    if (L->num_seqs > UINT32_MAX) return fail(err, errlen, "'%s': %zu sequences is more than the loader's 2^32 limit", pattern, L->num_seqs);
    if (shuffle) L->perm = (uint32_t*)mallocCheck(L->num_seqs * sizeof(uint32_t));
    size_t n = (size_t)B * T;
    L->inputs = (int*)mallocCheck(n * sizeof(int));
    L->targets = (int*)mallocCheck(n * sizeof(int));
    dataloader_advise(L, 0, 0);
    return 0;
}

// Moves to (epoch, cursor): the start for validation, or a checkpoint's position.
void dataloader_seek(DataLoader* L, int64_t epoch, size_t cursor) {
    L->epoch = epoch;
    L->cursor = cursor;
    dataloader_advise(L, epoch, cursor);
}

// Hands out the next micro batch in L->inputs / L->targets (B, T), and asks for the pages
// of the one after it.
void dataloader_next(DataLoader* L) {
    double t0 = wall_seconds();
    dataloader_gather(L, L->inputs, L->targets);
    L->cursor += (size_t)L->world * L->B;
    if (L->cursor >= L->seqs_per_epoch) { L->epoch++; L->cursor = 0; }
    dataloader_advise(L, L->epoch, L->cursor);
    L->last_wait = wall_seconds() - t0;
}

void dataloader_free(DataLoader* L) {
    for (int i = 0; i < L->num_shards; i++) shard_close(&L->shards[i]);
    free(L->shards); free(L->first_seq); free(L->perm);
    free(L->inputs); free(L->targets);
    memset(L, 0, sizeof(*L));
}

size_t dataloader_num_tokens(const DataLoader* L) {
    size_t n = 0;
    for (int i = 0; i < L->num_shards; i++) n += L->shards[i].num_tokens;
    return n;
}

// ----------------------------------------------------------------------------
// tokenizer: decode only, llm.c's format: uint32 header[256] = {magic 20240328, version
// 2, vocab size, start token id, 0...}; then each token id's bytes, length-prefixed:
// a uint8 length 1..255 and that many bytes (llm.c's encoding), or, for what that cannot
// say, a 0 byte, a uint32 length (0 for an empty token, or more than 255) and the bytes.
// A file whose tokens are all 1..255 bytes long is exactly llm.c's. The header's "EOT"
// field is the token each document starts with in the shards, which samples start from:
// <|endoftext|> for GPT-2, the BOS token of a LLaMA/DeepSeek tokenizer.

#define TOKENIZER_MAGIC 20240328
#define TOKENIZER_VERSION 2
#define TOKENIZER_MAX_TOKEN_BYTES (1 << 20) // a sanity bound on the escaped lengths

typedef struct {
    int vocab_size;
    int eot_token;    // the document start token (see above)
    char** tokens;    // NUL-terminated (a token with a NUL byte prints up to it)
} Tokenizer;

// Reads token i's length prefix. Returns the length, or -1.
long tokenizer_read_length(FILE* f) {
    unsigned char len;
    if (fread(&len, 1, 1, f) != 1) return -1;
    if (len > 0) return len;
    uint32_t long_len;
    if (fread(&long_len, sizeof long_len, 1, f) != 1 || long_len > TOKENIZER_MAX_TOKEN_BYTES) return -1;
    return (long)long_len;
}

int tokenizer_load(Tokenizer* tk, const char* path, char* err, size_t errlen) {
    memset(tk, 0, sizeof(*tk));
    FILE* f = fopen(path, "rb");
    if (f == NULL) return fail(err, errlen, "tokenizer '%s': %s (prepare it with `make data`)", path, strerror(errno));
    uint32_t header[256];
    int rc = 0;
    if (fread(header, sizeof(uint32_t), 256, f) != 256) rc = fail(err, errlen, "tokenizer '%s': truncated header", path);
    else if (header[0] != TOKENIZER_MAGIC) rc = fail(err, errlen, "tokenizer '%s': bad magic %u (expected %d)", path, header[0], TOKENIZER_MAGIC);
    else if (header[1] != TOKENIZER_VERSION) rc = fail(err, errlen, "tokenizer '%s': unsupported version %u (expected %d)", path, header[1], TOKENIZER_VERSION);
    else if (header[2] < 1 || header[2] > MAX_VOCAB_SIZE || header[3] >= header[2]) rc = fail(err, errlen, "tokenizer '%s': bad vocab size %u (1..%d) or start token id %u", path, header[2], MAX_VOCAB_SIZE, header[3]);
    if (rc) { fclose(f); return rc; }
    tk->vocab_size = (int)header[2];
    tk->eot_token = (int)header[3];
    tk->tokens = (char**)callocCheck(tk->vocab_size, sizeof(char*));
    for (int i = 0; i < tk->vocab_size && rc == 0; i++) {
        long len = tokenizer_read_length(f);
        if (len < 0) { rc = fail(err, errlen, "tokenizer '%s': truncated or invalid length at token %d", path, i); break; }
        tk->tokens[i] = (char*)mallocCheck((size_t)len + 1);
        if (fread(tk->tokens[i], 1, (size_t)len, f) != (size_t)len) rc = fail(err, errlen, "tokenizer '%s': truncated at token %d", path, i);
        tk->tokens[i][len] = '\0';
    }
    if (rc == 0 && fgetc(f) != EOF) rc = fail(err, errlen, "tokenizer '%s': unexpected bytes after %d tokens", path, tk->vocab_size);
    fclose(f);
    return rc;
}

const char* tokenizer_decode(const Tokenizer* tk, int token) {
    if (token < 0 || token >= tk->vocab_size) return "";
    return tk->tokens[token];
}

// Prints a token's bytes, leaving out control bytes that would garble a terminal.
void print_token_safely(FILE* out, const char* piece) {
    if (piece[0] != '\0' && piece[1] == '\0' && !isprint((unsigned char)piece[0]) && !isspace((unsigned char)piece[0]) && (unsigned char)piece[0] < 0x80) return;
    fputs(piece, out);
}

void tokenizer_free(Tokenizer* tk) {
    for (int i = 0; i < tk->vocab_size; i++) free(tk->tokens[i]);
    free(tk->tokens);
    memset(tk, 0, sizeof(*tk));
}

// ----------------------------------------------------------------------------
// checkpoints: DIR/step_00000100/{model.bin, optim_rank0000_of_0001.bin, state.bin}
// and DIR/latest naming the newest folder. A folder is written under a temporary
// name, every file fsync'ed, then renamed; `latest` is replaced atomically last. A
// crash at any point leaves the previous checkpoint intact and `latest` pointing at a
// complete folder.
//
// Every file starts with int64 header[128] (1024 bytes): magic, version, then the words
// named below (the rest are 0).
//   model.bin   the model's configuration; then num_params fp32 master weights
//   optim_*.bin a rank's partition; then [offset, offset + count) of fp32 master, Adam m, Adam v
//   state.bin   counters, data-loader position, seed, RNG, loss scaler (CheckpointState)

#define CKPT_MODEL_MAGIC 20261101
#define CKPT_OPTIM_MAGIC 20261102
#define CKPT_STATE_MAGIC 20261103
#define CKPT_VERSION 1
#define CKPT_HEADER_WORDS 128

enum { HDR_MAGIC, HDR_VERSION }; // every file
enum { MODEL_ARCH = 2, MODEL_DTYPE, MODEL_MAX_SEQ_LEN, MODEL_VOCAB, MODEL_PADDED_VOCAB, MODEL_LAYERS, MODEL_HEADS,
       MODEL_KV_HEADS, MODEL_CHANNELS, MODEL_FFN_HIDDEN, MODEL_NUM_PARAMS,
       MODEL_TIED, MODEL_NORM_EPS, MODEL_ROPE_THETA, MODEL_INIT_STD, // the floats as doubles' bits
       MODEL_BOS, MODEL_EOS }; // token id + 1, 0 = none
enum { OPTIM_RANK = 2, OPTIM_WORLD, OPTIM_OFFSET, OPTIM_COUNT, OPTIM_NUM_PARAMS };
enum { STATE_STEP = 2, STATE_ADAM_T, STATE_SCHED_IT, STATE_SKIPPED, STATE_LOADER_EPOCH, STATE_LOADER_CURSOR, STATE_SEQ_LEN,
       STATE_TRAIN_SEQS, STATE_GLOBAL_BATCH, STATE_WORLD_SIZE, STATE_SEED,
       STATE_RNG = 16,   // 4 words
       STATE_SCALE = 20, // a double
       STATE_SCALER_ITER, STATE_LAST_OVERFLOW_ITER, STATE_HYSTERESIS };

typedef struct {
    TrainState train;
    int64_t loader_epoch;
    int64_t loader_cursor;
    int64_t seq_len;
    int64_t train_seqs;       // sequences in the training data: must match on resume
    int64_t global_batch;
    int64_t world_size;
    uint64_t seed;
    Rng rng;                  // the trainer's sampling RNG
} CheckpointState;

void fsync_path(const char* path) {
    int fd = open(path, O_RDONLY);
    if (fd >= 0) { fsync(fd); close(fd); }
}

// Writes header + arrays to path via path.tmp, fsync, rename.
void write_file_atomic(const char* path, const int64_t* header, const float* const* arrays, const size_t* counts, int num_arrays) {
    char tmp[PATH_LEN];
    format_path(tmp, sizeof tmp, "%s.tmp", path);
    FILE* f = fopenCheck(tmp, "wb");
    fwrite_check(header, sizeof(int64_t), CKPT_HEADER_WORDS, f, tmp);
    for (int i = 0; i < num_arrays; i++) fwrite_check(arrays[i], sizeof(float), counts[i], f, tmp);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) fatal("cannot write '%s': %s", tmp, strerror(errno));
    fclose(f);
    if (rename(tmp, path) != 0) fatal("cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
}

// Opens a checkpoint file, checks magic, version and exact size; returns it positioned after the header.
FILE* open_checked(const char* path, int64_t magic, int64_t* header, long long payload_floats_per_count, int count_word, char* err, size_t errlen) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) { fail(err, errlen, "checkpoint file '%s': %s", path, strerror(errno)); return NULL; }
    long long bytes = file_size(path);
    const char* problem = NULL;
    if (fread(header, sizeof(int64_t), CKPT_HEADER_WORDS, f) != CKPT_HEADER_WORDS) problem = "truncated header";
    else if (header[HDR_MAGIC] != magic) problem = "bad magic (not this kind of checkpoint file)";
    else if (header[HDR_VERSION] != CKPT_VERSION) problem = "unsupported version";
    else if (count_word >= 0 && (header[count_word] < 0 || bytes != (long long)(CKPT_HEADER_WORDS * 8) + 4LL * payload_floats_per_count * header[count_word])) {
        problem = "size does not match its header (truncated or corrupt)";
    }
    if (problem) { fclose(f); fail(err, errlen, "checkpoint file '%s': %s", path, problem); return NULL; }
    return f;
}

void model_header(int64_t* h, const ModelConfig* m, size_t num_params) {
    memset(h, 0, CKPT_HEADER_WORDS * sizeof(int64_t));
    h[HDR_MAGIC] = CKPT_MODEL_MAGIC; h[HDR_VERSION] = CKPT_VERSION;
    h[MODEL_ARCH] = m->arch; h[MODEL_DTYPE] = DTYPE_FP32; h[MODEL_MAX_SEQ_LEN] = m->max_seq_len;
    h[MODEL_VOCAB] = m->vocab_size; h[MODEL_PADDED_VOCAB] = m->padded_vocab_size; h[MODEL_LAYERS] = m->num_layers;
    h[MODEL_HEADS] = m->num_heads; h[MODEL_KV_HEADS] = m->num_kv_heads; h[MODEL_CHANNELS] = m->channels;
    h[MODEL_FFN_HIDDEN] = m->ffn_hidden; h[MODEL_NUM_PARAMS] = (int64_t)num_params;
    double eps = m->norm_eps, theta = m->rope_theta, std = m->init_std;
    h[MODEL_TIED] = m->tied;
    memcpy(&h[MODEL_NORM_EPS], &eps, 8); memcpy(&h[MODEL_ROPE_THETA], &theta, 8); memcpy(&h[MODEL_INIT_STD], &std, 8);
    h[MODEL_BOS] = m->bos_token + 1; h[MODEL_EOS] = m->eos_token + 1;
}

// Reads a model file's configuration (and parameter count) without the weights.
int model_file_config(const char* path, ModelConfig* m, size_t* num_params, char* err, size_t errlen) {
    int64_t h[CKPT_HEADER_WORDS];
    FILE* f = open_checked(path, CKPT_MODEL_MAGIC, h, 1, MODEL_NUM_PARAMS, err, errlen);
    if (f == NULL) return -1;
    fclose(f);
    if (h[MODEL_DTYPE] != DTYPE_FP32) return fail(err, errlen, "checkpoint file '%s': weights dtype %lld, expected fp32 master weights", path, (long long)h[MODEL_DTYPE]);
    for (int i = MODEL_MAX_SEQ_LEN; i <= MODEL_FFN_HIDDEN; i++) {
        if (h[i] < 0 || h[i] > INT32_MAX) return fail(err, errlen, "checkpoint file '%s': header field %d out of range", path, i);
    }
    if (h[MODEL_TIED] < 0 || h[MODEL_TIED] > 1 || h[MODEL_BOS] < 0 || h[MODEL_BOS] > MAX_VOCAB_SIZE || h[MODEL_EOS] < 0 || h[MODEL_EOS] > MAX_VOCAB_SIZE) {
        return fail(err, errlen, "checkpoint file '%s': header fields out of range", path);
    }
    double eps, theta, std;
    memcpy(&eps, &h[MODEL_NORM_EPS], 8); memcpy(&theta, &h[MODEL_ROPE_THETA], 8); memcpy(&std, &h[MODEL_INIT_STD], 8);
    ModelConfig c = {(int)h[MODEL_ARCH], (int)h[MODEL_MAX_SEQ_LEN], (int)h[MODEL_VOCAB], (int)h[MODEL_PADDED_VOCAB], (int)h[MODEL_LAYERS],
                     (int)h[MODEL_HEADS], (int)h[MODEL_KV_HEADS], (int)h[MODEL_CHANNELS], (int)h[MODEL_FFN_HIDDEN],
                     (int)h[MODEL_TIED], (float)eps, (float)theta, (float)std, (int)h[MODEL_BOS] - 1, (int)h[MODEL_EOS] - 1};
    if (c.arch == ARCH_GPT2 && eps == 0.0) { // written before these fields: GPT-2's constants
        c.tied = 1; c.norm_eps = 1e-5f; c.init_std = 0.02f;
    }
    char merr[300];
    if (model_config_check(&c, merr, sizeof merr)) return fail(err, errlen, "checkpoint file '%s': %s", path, merr);
    if ((size_t)h[MODEL_NUM_PARAMS] != model_num_params(&c)) {
        return fail(err, errlen, "checkpoint file '%s': %lld parameters, but its configuration has %zu", path, (long long)h[MODEL_NUM_PARAMS], model_num_params(&c));
    }
    *m = c;
    *num_params = (size_t)h[MODEL_NUM_PARAMS];
    return 0;
}

int model_file_read(const char* path, float* params, size_t num_params, char* err, size_t errlen) {
    int64_t h[CKPT_HEADER_WORDS];
    FILE* f = open_checked(path, CKPT_MODEL_MAGIC, h, 1, MODEL_NUM_PARAMS, err, errlen);
    if (f == NULL) return -1;
    if ((size_t)h[MODEL_NUM_PARAMS] != num_params) {
        fclose(f);
        return fail(err, errlen, "checkpoint file '%s': %lld parameters, the model has %zu", path, (long long)h[MODEL_NUM_PARAMS], num_params);
    }
    fread_check(params, sizeof(float), num_params, f, path);
    fclose(f);
    return 0;
}

void model_file_write(const char* path, const ModelConfig* m, const float* params, size_t num_params) {
    int64_t h[CKPT_HEADER_WORDS];
    model_header(h, m, num_params);
    const float* arrays[1] = {params};
    size_t counts[1] = {num_params};
    write_file_atomic(path, h, arrays, counts, 1);
}

void state_file_write(const char* path, const CheckpointState* s) {
    int64_t h[CKPT_HEADER_WORDS];
    memset(h, 0, sizeof h);
    const TrainState* t = &s->train;
    const LossScaler* ls = &t->scaler;
    h[HDR_MAGIC] = CKPT_STATE_MAGIC; h[HDR_VERSION] = CKPT_VERSION;
    h[STATE_STEP] = t->step; h[STATE_ADAM_T] = t->adam_t; h[STATE_SCHED_IT] = t->sched_it; h[STATE_SKIPPED] = t->skipped;
    h[STATE_LOADER_EPOCH] = s->loader_epoch; h[STATE_LOADER_CURSOR] = s->loader_cursor; h[STATE_SEQ_LEN] = s->seq_len;
    h[STATE_TRAIN_SEQS] = s->train_seqs; h[STATE_GLOBAL_BATCH] = s->global_batch; h[STATE_WORLD_SIZE] = s->world_size;
    memcpy(&h[STATE_SEED], &s->seed, 8);
    memcpy(&h[STATE_RNG], s->rng.s, 32);
    memcpy(&h[STATE_SCALE], &ls->scale, 8);
    h[STATE_SCALER_ITER] = ls->cur_iter; h[STATE_LAST_OVERFLOW_ITER] = ls->last_overflow_iter; h[STATE_HYSTERESIS] = ls->hyst;
    write_file_atomic(path, h, NULL, NULL, 0);
}

int state_file_read(const char* path, CheckpointState* s, char* err, size_t errlen) {
    int64_t h[CKPT_HEADER_WORDS];
    FILE* f = open_checked(path, CKPT_STATE_MAGIC, h, 0, -1, err, errlen);
    if (f == NULL) return -1;
    fclose(f);
    if (file_size(path) != CKPT_HEADER_WORDS * 8) return fail(err, errlen, "checkpoint file '%s': wrong size", path);
    TrainState* t = &s->train;
    LossScaler* ls = &t->scaler; // the scaler's configuration comes from the config, its state from here
    t->step = h[STATE_STEP]; t->adam_t = h[STATE_ADAM_T]; t->sched_it = h[STATE_SCHED_IT]; t->skipped = h[STATE_SKIPPED];
    s->loader_epoch = h[STATE_LOADER_EPOCH]; s->loader_cursor = h[STATE_LOADER_CURSOR]; s->seq_len = h[STATE_SEQ_LEN];
    s->train_seqs = h[STATE_TRAIN_SEQS]; s->global_batch = h[STATE_GLOBAL_BATCH]; s->world_size = h[STATE_WORLD_SIZE];
    memcpy(&s->seed, &h[STATE_SEED], 8);
    memcpy(s->rng.s, &h[STATE_RNG], 32);
    memcpy(&ls->scale, &h[STATE_SCALE], 8);
    ls->cur_iter = h[STATE_SCALER_ITER]; ls->last_overflow_iter = h[STATE_LAST_OVERFLOW_ITER]; ls->hyst = h[STATE_HYSTERESIS];
    if (t->step < 0 || t->adam_t < 0 || t->adam_t > t->step || t->sched_it != t->adam_t - 1 || s->loader_epoch < 0 || s->loader_cursor < 0 || !(ls->scale > 0)) {
        return fail(err, errlen, "checkpoint file '%s': inconsistent counters (corrupt file)", path);
    }
    return 0;
}

void optim_file_name(char* out, size_t n, const char* folder, int rank, int world) {
    format_path(out, n, "%s/optim_rank%04d_of_%04d.bin", folder, rank, world);
}

void optim_file_write(const char* folder, int rank, int world, size_t offset, size_t count, size_t num_params,
                             const float* master, const float* m, const float* v) {
    char path[PATH_LEN];
    optim_file_name(path, sizeof path, folder, rank, world);
    int64_t h[CKPT_HEADER_WORDS];
    memset(h, 0, sizeof h);
    h[HDR_MAGIC] = CKPT_OPTIM_MAGIC; h[HDR_VERSION] = CKPT_VERSION; h[OPTIM_RANK] = rank; h[OPTIM_WORLD] = world;
    h[OPTIM_OFFSET] = (int64_t)offset; h[OPTIM_COUNT] = (int64_t)count; h[OPTIM_NUM_PARAMS] = (int64_t)num_params;
    const float* arrays[3] = {master, m, v};
    size_t counts[3] = {count, count, count};
    write_file_atomic(path, h, arrays, counts, 3);
}

// Fills the partition [offset, offset + count) of master/m/v from the optimizer files of
// a checkpoint saved by `saved_world` ranks: partitions are contiguous ranges of one
// flat buffer, so any number of ranks can load any other number's files.
int optim_files_read(const char* folder, int saved_world, size_t offset, size_t count, size_t num_params,
                            float* master, float* m, float* v, char* err, size_t errlen) {
    // padding at the end of the flat buffer is zero and not stored
    size_t end = offset + count < num_params ? offset + count : num_params;
    size_t needed = end > offset ? end - offset : 0, covered = 0;
    memset(master, 0, count * sizeof(float)); memset(m, 0, count * sizeof(float)); memset(v, 0, count * sizeof(float));
    for (int r = 0; r < saved_world; r++) {
        char path[PATH_LEN];
        optim_file_name(path, sizeof path, folder, r, saved_world);
        int64_t h[CKPT_HEADER_WORDS];
        FILE* f = open_checked(path, CKPT_OPTIM_MAGIC, h, 3, OPTIM_COUNT, err, errlen);
        if (f == NULL) return -1;
        if (h[OPTIM_RANK] != r || h[OPTIM_WORLD] != saved_world || (size_t)h[OPTIM_NUM_PARAMS] != num_params || h[OPTIM_OFFSET] < 0 ||
            (size_t)(h[OPTIM_OFFSET] + h[OPTIM_COUNT]) > num_params + 2 * (size_t)saved_world) {
            fclose(f);
            return fail(err, errlen, "checkpoint file '%s': header does not match (rank %lld of %lld, %lld params; expected rank %d of %d, %zu params)", path, (long long)h[OPTIM_RANK], (long long)h[OPTIM_WORLD], (long long)h[OPTIM_NUM_PARAMS], r, saved_world, num_params);
        }
        size_t lo = (size_t)h[OPTIM_OFFSET], hi = lo + (size_t)h[OPTIM_COUNT];
        size_t a = lo > offset ? lo : offset, b = hi < end ? hi : end;
        if (a < b) {
            float* dst[3] = {master, m, v};
            for (int k = 0; k < 3; k++) {
                if (fseek(f, (long)(CKPT_HEADER_WORDS * 8 + 4 * ((size_t)k * (hi - lo) + (a - lo))), SEEK_SET) != 0) fatal("cannot seek in '%s'", path);
                fread_check(dst[k] + (a - offset), sizeof(float), b - a, f, path);
            }
            covered += b - a;
        }
        fclose(f);
    }
    if (covered != needed) return fail(err, errlen, "checkpoint '%s': optimizer files cover %zu of the %zu values this rank needs", folder, covered, needed);
    return 0;
}

void checkpoint_folder(char* out, size_t n, const char* dir, int64_t step) {
    format_path(out, n, "%s/step_%08lld", dir, (long long)step);
}

void make_dirs(const char* path) {
    char buf[PATH_LEN];
    format_path(buf, sizeof buf, "%s", path);
    for (char* p = buf + 1; *p; p++) {
        if (*p == '/') { *p = '\0'; mkdir(buf, 0755); *p = '/'; }
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) fatal("cannot create directory '%s': %s", path, strerror(errno));
}

// Removes a checkpoint folder (flat: files only).
void remove_folder(const char* path) {
    DIR* d = opendir(path);
    if (d == NULL) return;
    struct dirent* e;
    char file[PATH_LEN];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        format_path(file, sizeof file, "%s/%s", path, e->d_name);
        unlink(file);
    }
    closedir(d);
    rmdir(path);
}

// Step 1 of a save: an empty temporary folder for the files of every rank.
void checkpoint_begin(const char* dir, int64_t step, char* tmp_folder, size_t n) {
    char folder[PATH_LEN];
    checkpoint_folder(folder, sizeof folder, dir, step);
    format_path(tmp_folder, n, "%s.tmp", folder);
    make_dirs(dir);
    remove_folder(tmp_folder); // a leftover of a crashed save
    make_dirs(tmp_folder);
}

// Last step of a save, once every rank's files are in the temporary folder.
void checkpoint_commit(const char* dir, int64_t step, const char* tmp_folder) {
    char folder[PATH_LEN], old[1100], latest[1100], latest_tmp[1100];
    checkpoint_folder(folder, sizeof folder, dir, step);
    fsync_path(tmp_folder);
    format_path(old, sizeof old, "%s.old", folder);
    remove_folder(old);
    int replaced = rename(folder, old) == 0; // a checkpoint of the same step saved before
    if (rename(tmp_folder, folder) != 0) fatal("cannot rename '%s' to '%s': %s", tmp_folder, folder, strerror(errno));
    format_path(latest, sizeof latest, "%s/latest", dir);
    format_path(latest_tmp, sizeof latest_tmp, "%s/latest.tmp", dir);
    FILE* f = fopenCheck(latest_tmp, "w");
    fprintf(f, "step_%08lld\n", (long long)step);
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) fatal("cannot write '%s': %s", latest_tmp, strerror(errno));
    fclose(f);
    if (rename(latest_tmp, latest) != 0) fatal("cannot rename '%s' to '%s': %s", latest_tmp, latest, strerror(errno));
    fsync_path(dir);
    if (replaced) remove_folder(old);
}

// Finds the folder DIR/latest names. Returns 0 with the folder path, or -1.
int checkpoint_latest(const char* dir, char* folder, size_t n, char* err, size_t errlen) {
    char latest[PATH_LEN], tag[256] = {0};
    format_path(latest, sizeof latest, "%s/latest", dir);
    FILE* f = fopen(latest, "r");
    if (f == NULL) return fail(err, errlen, "--resume: no checkpoint in '%s' ('%s': %s)", dir, latest, strerror(errno));
    if (fgets(tag, sizeof tag, f) == NULL) tag[0] = '\0';
    fclose(f);
    tag[strcspn(tag, "\r\n")] = '\0';
    long long step;
    char extra;
    if (sscanf(tag, "step_%lld%c", &step, &extra) != 1 || step < 0) return fail(err, errlen, "'%s' does not name a checkpoint folder (got \"%s\")", latest, tag);
    checkpoint_folder(folder, n, dir, step);
    struct stat st;
    if (stat(folder, &st) != 0 || !S_ISDIR(st.st_mode)) return fail(err, errlen, "'%s' names '%s', which does not exist", latest, folder);
    return 0;
}

// ----------------------------------------------------------------------------
// safetensors: Hugging Face's weight files. A file is a u64 N (little-endian), N bytes of
// JSON header, then the data section:
//   {"__metadata__": {"format": "pt"}, "wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [0, 154389504]}, ...}
// with offsets relative to the data section. The reader validates as the reference
// implementation (the Rust `safetensors` crate) does, so what it accepts transformers
// accepts too: N at most 100,000,000 and inside the file; the header a JSON object, with an
// optional "__metadata__" object of strings; every tensor a known dtype, a shape, and
// data_offsets whose span is exactly shape x dtype size; the spans, in offset order, tile
// the data section from its first byte to its last (no gap, no overlap, nothing after).
// The file is mmap'ed and F32, F16 and BF16 tensors convert to fp32 exactly. The writer
// writes F32 (or BF16 / F16, rounded to nearest even) atomically: tmp, fsync, rename.
// The format and every machine this runs on are little-endian.

#define ST_MAX_HEADER 100000000 // the crate's MAX_HEADER_SIZE
#define ST_MAX_DIMS 8

// The format's dtypes (those of one byte or more). Weights must be F32, F16 or BF16.
enum { ST_BOOL, ST_U8, ST_I8, ST_F8_E5M2, ST_F8_E4M3, ST_I16, ST_U16, ST_F16, ST_BF16, ST_I32, ST_U32, ST_F32,
       ST_F64, ST_I64, ST_U64, ST_NUM_DTYPES };
typedef struct { const char* name; int bytes; } StDtype;
static const StDtype ST_DTYPES[ST_NUM_DTYPES] = {
    {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
    {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4}, {"F64", 8}, {"I64", 8}, {"U64", 8}};

typedef struct {
    char* name;
    int dtype;                   // ST_F32, ...
    int ndim;                    // 0 is a scalar
    int64_t shape[ST_MAX_DIMS];
    size_t numel;
    size_t begin, end;           // its bytes in the data section
} StTensor;

typedef struct {
    char path[PATH_LEN];
    unsigned char* map;          // the whole file, mmap'ed read-only
    size_t file_bytes;
    const unsigned char* data;   // the data section
    size_t data_bytes;
    StTensor* tensors;           // in the header's order
    int count;
} SafeTensors;

// IEEE half (1, 5, 10 bits) to float: exact, with subnormals, infinities and NaN payloads.
float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) { // zero or subnormal: man * 2^-24, exact in float
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13);     // inf, NaN
    else bits = sign | ((exp + 127 - 15) << 23) | (man << 13);   // normal: exponent rebiased
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// bfloat16 is a float's top 16 bits.
float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// float to bfloat16, rounded to nearest even; NaN stays NaN (quiet), overflow rounds to inf.
uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// float to IEEE half, rounded to nearest even: at or above 65520 (halfway past the largest
// half, 65504) inf; below 2^-14 a subnormal (or zero); NaN stays NaN (quiet).
uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t a = x & 0x7fffffff;
    if (a > 0x7f800000) return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x1ff);
    if (a >= 0x477ff000) return sign | 0x7c00;
    if (a < 0x38800000) { // |f| * 2^24 is exact; nearbyintf rounds half to even (the default mode)
        float m;
        memcpy(&m, &a, 4);
        return sign | (uint16_t)nearbyintf(m * 16777216.0f); // 1024 carries into the smallest normal
    }
    uint32_t r = a - ((uint32_t)(127 - 15) << 23); // rebias; then round off 13 mantissa bits
    r += 0xfff + ((r >> 13) & 1);
    return sign | (uint16_t)(r >> 13);
}

// A growing text buffer (JSON headers, config.json), NUL-terminated.
typedef struct { char* s; size_t len, cap; } TextBuf;

void tb_printf(TextBuf* b, const char* fmt, ...) {
    for (;;) {
        size_t room = b->cap - b->len;
        if (room > 0) {
            va_list ap;
            va_start(ap, fmt);
            int n = vsnprintf(b->s + b->len, room, fmt, ap);
            va_end(ap);
            if (n < 0) fatal("internal: bad format '%s'", fmt);
            if ((size_t)n < room) { b->len += (size_t)n; return; }
        }
        b->cap = 2 * b->cap + 1024;
        b->s = (char*)realloc(b->s, b->cap);
        if (b->s == NULL) fatal("out of memory (text of %zu bytes)", b->cap);
    }
}

// The member `key` of a JSON object, or NULL.
const JsonValue* json_member(const JsonValue* obj, const char* key) {
    if (obj == NULL || obj->type != JSON_OBJECT) return NULL;
    for (int i = 0; i < obj->count; i++) if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

// A JSON number that is a whole number in 0..2^53 (where doubles hold every integer).
int json_is_count(const JsonValue* v) {
    return v->type == JSON_NUMBER && v->number >= 0 && v->number <= 9007199254740992.0 && v->number == floor(v->number);
}

int st_dtype_find(const char* name) {
    for (int i = 0; i < ST_NUM_DTYPES; i++) if (strcmp(ST_DTYPES[i].name, name) == 0) return i;
    return -1;
}

// "[2, 3]"
void st_shape_text(const int64_t* shape, int ndim, char* out, size_t n) {
    size_t len = (size_t)snprintf(out, n, "[");
    for (int i = 0; i < ndim && len < n; i++) len += (size_t)snprintf(out + len, n - len, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (len < n) snprintf(out + len, n - len, "]");
}

// One tensor's header entry: dtype, shape, data_offsets, and their agreement.
int st_parse_tensor(const SafeTensors* st, const char* name, const JsonValue* v, StTensor* t, char* err, size_t errlen) {
    const char* p = st->path;
    if (v->type != JSON_OBJECT) return fail(err, errlen, "safetensors file '%s': tensor '%s': expected an object with dtype, shape and data_offsets, got %s", p, name, json_type_name(v->type));
    const JsonValue *dtype = json_member(v, "dtype"), *shape = json_member(v, "shape"), *offsets = json_member(v, "data_offsets");
    if (dtype == NULL || dtype->type != JSON_STRING) return fail(err, errlen, "safetensors file '%s': tensor '%s': \"dtype\" missing or not a string", p, name);
    t->dtype = st_dtype_find(dtype->string);
    if (t->dtype < 0) {
        return fail(err, errlen, "safetensors file '%s': tensor '%s': unknown dtype \"%s\" (known: BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64)", p, name, dtype->string);
    }
    if (shape == NULL || shape->type != JSON_ARRAY) return fail(err, errlen, "safetensors file '%s': tensor '%s': \"shape\" missing or not an array", p, name);
    if (shape->count > ST_MAX_DIMS) return fail(err, errlen, "safetensors file '%s': tensor '%s': %d dimensions (at most %d are read)", p, name, shape->count, ST_MAX_DIMS);
    t->ndim = shape->count;
    t->numel = 1;
    int overflow = 0;
    for (int i = 0; i < shape->count; i++) {
        if (!json_is_count(&shape->items[i])) return fail(err, errlen, "safetensors file '%s': tensor '%s': shape entries must be non-negative integers", p, name);
        t->shape[i] = (int64_t)shape->items[i].number;
        if (t->shape[i] != 0 && t->numel > SIZE_MAX / 8 / (size_t)t->shape[i]) overflow = 1;
        else t->numel *= (size_t)t->shape[i];
    }
    if (overflow) return fail(err, errlen, "safetensors file '%s': tensor '%s': its shape has more elements than a file can hold", p, name);
    if (offsets == NULL || offsets->type != JSON_ARRAY || offsets->count != 2 || !json_is_count(&offsets->items[0]) || !json_is_count(&offsets->items[1])) {
        return fail(err, errlen, "safetensors file '%s': tensor '%s': \"data_offsets\" must be [begin, end], two non-negative integers", p, name);
    }
    t->begin = (size_t)offsets->items[0].number;
    t->end = (size_t)offsets->items[1].number;
    char dims[128];
    st_shape_text(t->shape, t->ndim, dims, sizeof dims);
    size_t bytes = t->numel * (size_t)ST_DTYPES[t->dtype].bytes;
    if (t->end < t->begin || t->end - t->begin != bytes) {
        return fail(err, errlen, "safetensors file '%s': tensor '%s': shape %s of %s is %zu bytes, but data_offsets [%zu, %zu] span %lld",
                    p, name, dims, ST_DTYPES[t->dtype].name, bytes, t->begin, t->end, (long long)t->end - (long long)t->begin);
    }
    if (t->end > st->data_bytes) {
        return fail(err, errlen, "safetensors file '%s': tensor '%s': data_offsets [%zu, %zu] go beyond the data section (%zu bytes after the header): truncated or corrupt",
                    p, name, t->begin, t->end, st->data_bytes);
    }
    return 0;
}

int st_compare_offsets(const void* a, const void* b) {
    const StTensor *x = *(const StTensor* const*)a, *y = *(const StTensor* const*)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

// The tensors' spans, in offset order, must cover the data section exactly once.
int st_check_tiling(const SafeTensors* st, char* err, size_t errlen) {
    const StTensor** order = (const StTensor**)mallocCheck((size_t)st->count * sizeof(StTensor*));
    for (int i = 0; i < st->count; i++) order[i] = &st->tensors[i];
    qsort(order, (size_t)st->count, sizeof(StTensor*), st_compare_offsets);
    size_t pos = 0;
    int rc = 0;
    for (int i = 0; i < st->count && rc == 0; i++) {
        const StTensor* t = order[i];
        if (t->begin < pos) {
            const StTensor* prev = order[i - 1];
            rc = fail(err, errlen, "safetensors file '%s': tensor '%s' (bytes [%zu, %zu]) overlaps tensor '%s' (bytes [%zu, %zu])",
                      st->path, t->name, t->begin, t->end, prev->name, prev->begin, prev->end);
        } else if (t->begin > pos) {
            rc = fail(err, errlen, "safetensors file '%s': bytes [%zu, %zu] of the data section belong to no tensor (a gap before tensor '%s')", st->path, pos, t->begin, t->name);
        }
        pos = t->end;
    }
    if (rc == 0 && pos != st->data_bytes) {
        rc = fail(err, errlen, "safetensors file '%s': %zu bytes after the last tensor's data belong to no tensor (the data section has %zu bytes, the header describes %zu)",
                  st->path, st->data_bytes - pos, st->data_bytes, pos);
    }
    free(order);
    return rc;
}

// The header, once the file is mapped: length, JSON, tensors, tiling.
int st_parse_header(SafeTensors* st, char* err, size_t errlen) {
    const char* p = st->path;
    uint64_t n;
    memcpy(&n, st->map, 8);
    if (n > ST_MAX_HEADER) return fail(err, errlen, "safetensors file '%s': header length %llu is over the limit of %d bytes (not a safetensors file, or corrupt)", p, (unsigned long long)n, ST_MAX_HEADER);
    if (n > st->file_bytes - 8) return fail(err, errlen, "safetensors file '%s': header length %llu goes beyond the end of the file (%zu bytes): truncated or not a safetensors file", p, (unsigned long long)n, st->file_bytes);
    st->data = st->map + 8 + n;
    st->data_bytes = st->file_bytes - 8 - (size_t)n;
    if (memchr(st->map + 8, '\0', (size_t)n)) return fail(err, errlen, "safetensors file '%s': the header contains a NUL byte (not JSON)", p);
    char* text = (char*)mallocCheck((size_t)n + 1);
    memcpy(text, st->map + 8, (size_t)n);
    text[n] = '\0';
    JsonValue root;
    char jerr[400];
    int rc = json_parse(text, &root, jerr, sizeof jerr);
    free(text);
    if (rc) return fail(err, errlen, "safetensors file '%s': the header is not valid JSON: %s", p, jerr);
    if (root.type != JSON_OBJECT) rc = fail(err, errlen, "safetensors file '%s': the header must be a JSON object, got %s", p, json_type_name(root.type));
    st->tensors = (StTensor*)callocCheck((size_t)root.count, sizeof(StTensor));
    for (int i = 0; i < root.count && rc == 0; i++) {
        const JsonValue* v = &root.items[i];
        if (strcmp(root.keys[i], "__metadata__") == 0) {
            int strings = v->type == JSON_OBJECT;
            for (int k = 0; strings && k < v->count; k++) strings = v->items[k].type == JSON_STRING;
            if (!strings) rc = fail(err, errlen, "safetensors file '%s': \"__metadata__\" must be an object of strings", p);
            continue;
        }
        StTensor* t = &st->tensors[st->count];
        rc = st_parse_tensor(st, root.keys[i], v, t, err, errlen);
        t->name = strdup_check(root.keys[i]); // json_parse refuses duplicate keys: names are unique
        st->count++;
    }
    json_free(&root);
    if (rc == 0) rc = st_check_tiling(st, err, errlen);
    return rc;
}

void safetensors_close(SafeTensors* st) {
    if (st->map) munmap(st->map, st->file_bytes);
    for (int i = 0; i < st->count; i++) free(st->tensors[i].name);
    free(st->tensors);
    memset(st, 0, sizeof(*st));
}

// Opens and validates a safetensors file. Returns 0, or -1 with err naming the file (and tensor).
int safetensors_open(SafeTensors* st, const char* path, char* err, size_t errlen) {
    memset(st, 0, sizeof(*st));
    snprintf(st->path, sizeof st->path, "%s", path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail(err, errlen, "safetensors file '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) { close(fd); return fail(err, errlen, "safetensors file '%s': not a regular file", path); }
    if (sb.st_size < 8) { close(fd); return fail(err, errlen, "safetensors file '%s': %lld bytes, shorter than the 8-byte header length (not a safetensors file)", path, (long long)sb.st_size); }
    void* map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return fail(err, errlen, "safetensors file '%s': cannot map it: %s", path, strerror(errno));
    st->map = (unsigned char*)map;
    st->file_bytes = (size_t)sb.st_size;
    if (st_parse_header(st, err, errlen)) { safetensors_close(st); return -1; }
    return 0;
}

const StTensor* safetensors_find(const SafeTensors* st, const char* name) {
    for (int i = 0; i < st->count; i++) if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

// Tensor t as fp32 into out (t->numel floats): F32, F16 and BF16 exactly; other dtypes refused.
int safetensors_read_f32(const SafeTensors* st, const StTensor* t, float* out, char* err, size_t errlen) {
    int dtype = t->dtype;
    if (dtype != ST_F32 && dtype != ST_F16 && dtype != ST_BF16) {
        return fail(err, errlen, "safetensors file '%s': tensor '%s' has dtype %s; weights must be F32, F16 or BF16", st->path, t->name, ST_DTYPES[dtype].name);
    }
    const unsigned char* src = st->data + t->begin; // any alignment: values are copied bytewise
    size_t n = t->numel;
    #pragma omp parallel for if (n >= 65536)
    for (size_t i = 0; i < n; i++) {
        if (dtype == ST_F32) { memcpy(&out[i], src + 4 * i, 4); continue; }
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        out[i] = dtype == ST_F16 ? f16_to_f32(h) : bf16_to_f32(h);
    }
    return 0;
}

// A tensor to write: fp32 values in memory, stored in the file with the given shape.
typedef struct {
    const char* name;
    int ndim;             // 1 or 2
    int64_t shape[2];     // as stored in the file
    const float* data;    // row-major values of shape, or with transposed, of (shape[1], shape[0])
    int transposed;       // store the transpose of data (GPT-2's Conv1D weights are (in, out))
} StWrite;

size_t st_write_numel(const StWrite* t) { return (size_t)t->shape[0] * (t->ndim == 2 ? (size_t)t->shape[1] : 1); }

// The values of t in the file's order, converted to dtype, in chunks.
int st_write_values(FILE* f, const char* path, const StWrite* t, int dtype, char* err, size_t errlen) {
    size_t n = st_write_numel(t), rows = (size_t)t->shape[0], cols = t->ndim == 2 ? (size_t)t->shape[1] : 1;
    size_t esize = (size_t)ST_DTYPES[dtype].bytes;
    if (dtype == ST_F32 && !t->transposed) {
        return fwrite(t->data, 4, n, f) == n ? 0 : fail(err, errlen, "cannot write '%s': %s", path, strerror(errno));
    }
    const size_t chunk = 1 << 20;
    unsigned char* buf = (unsigned char*)mallocCheck(chunk * esize);
    int rc = 0;
    for (size_t k0 = 0; k0 < n && rc == 0; k0 += chunk) {
        size_t m = n - k0 < chunk ? n - k0 : chunk;
        for (size_t k = 0; k < m; k++) {
            size_t e = k0 + k; // element (e / cols, e % cols) of the file's matrix
            float x = t->transposed ? t->data[(e % cols) * rows + e / cols] : t->data[e];
            if (dtype == ST_F32) { memcpy(buf + 4 * k, &x, 4); continue; }
            uint16_t h = dtype == ST_BF16 ? f32_to_bf16(x) : f32_to_f16(x);
            memcpy(buf + 2 * k, &h, 2);
        }
        if (fwrite(buf, esize, m, f) != m) rc = fail(err, errlen, "cannot write '%s': %s", path, strerror(errno));
    }
    free(buf);
    return rc;
}

// Writes the tensors, in order, to a safetensors file of dtype ST_F32, ST_BF16 or ST_F16
// (metadata {"format": "pt"}, which transformers requires; the header padded with spaces
// so that the data starts at a multiple of 8 bytes), via PATH.tmp, fsync, rename.
int safetensors_write(const char* path, const StWrite* t, int count, int dtype, char* err, size_t errlen) {
    if (dtype != ST_F32 && dtype != ST_BF16 && dtype != ST_F16) return fail(err, errlen, "internal: safetensors_write('%s'): dtype %d", path, dtype);
    TextBuf h = {NULL, 0, 0};
    tb_printf(&h, "{\"__metadata__\":{\"format\":\"pt\"}");
    size_t offset = 0;
    for (int i = 0; i < count; i++) {
        if (strpbrk(t[i].name, "\"\\") || t[i].ndim < 1 || t[i].ndim > 2) { free(h.s); return fail(err, errlen, "internal: safetensors_write('%s'): tensor '%s'", path, t[i].name); }
        size_t bytes = st_write_numel(&t[i]) * (size_t)ST_DTYPES[dtype].bytes;
        tb_printf(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld", t[i].name, ST_DTYPES[dtype].name, (long long)t[i].shape[0]);
        if (t[i].ndim == 2) tb_printf(&h, ",%lld", (long long)t[i].shape[1]);
        tb_printf(&h, "],\"data_offsets\":[%zu,%zu]}", offset, offset + bytes);
        offset += bytes;
    }
    tb_printf(&h, "}");
    while (h.len % 8) tb_printf(&h, " ");
    char tmp[PATH_LEN];
    format_path(tmp, sizeof tmp, "%s.tmp", path);
    FILE* f = fopen(tmp, "wb");
    if (f == NULL) { free(h.s); return fail(err, errlen, "cannot create '%s': %s", tmp, strerror(errno)); }
    uint64_t n = h.len;
    int rc = fwrite(&n, 8, 1, f) == 1 && fwrite(h.s, 1, h.len, f) == h.len ? 0 : fail(err, errlen, "cannot write '%s': %s", tmp, strerror(errno));
    free(h.s);
    for (int i = 0; i < count && rc == 0; i++) rc = st_write_values(f, tmp, &t[i], dtype, err, errlen);
    if (rc == 0 && (fflush(f) != 0 || fsync(fileno(f)) != 0)) rc = fail(err, errlen, "cannot write '%s': %s", tmp, strerror(errno));
    if (fclose(f) != 0 && rc == 0) rc = fail(err, errlen, "cannot write '%s': %s", tmp, strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0) rc = fail(err, errlen, "cannot rename '%s' to '%s': %s", tmp, path, strerror(errno));
    if (rc) unlink(tmp);
    return rc;
}

// ----------------------------------------------------------------------------
// hugging face: model directories as transformers' save_pretrained writes them,
//   config.json                       architecture and sizes (LlamaConfig, GPT2Config)
//   model.safetensors                 the weights; when large, shards instead:
//   model-00001-of-0000N.safetensors  ... and model.safetensors.index.json:
//                                     {"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}
//   tokenizer.json, ...               the tokenizer, copied as it is
// read into (hf_config_read, hf_weights_read) and written from (hf_write) the flat fp32
// buffer. One table, hf_tensors, maps Hugging Face's tensor names onto the parameter table,
// for both directions:
//   LLaMA  model.embed_tokens (V,C) -> wte rows 0..V-1     model.layers.{l}.input_layernorm -> ln1w
//          self_attn.q_proj, k_proj, v_proj -> qkvw rows [q; k; v]   self_attn.o_proj -> attprojw
//          post_attention_layernorm -> ln2w   mlp.gate_proj, up_proj -> fcw rows [gate; up]
//          mlp.down_proj -> fcprojw   model.norm -> lnfw   lm_head (V,C) -> lm_head rows (untied only)
//   GPT-2  wte, wpe, h.{l}.ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f; read
//          with or without the "transformer." prefix (openai-community/gpt2 has none), written
//          with it. Its Conv1D weights are stored (in, out): the transpose of ours.
// Every tensor the configuration needs must be there with its exact shape; a tensor it does
// not use is refused (a wrong model type shows), except non-parameter buffers old files carry.

typedef struct {
    char name[96];
    int ndim;          // 1 or 2
    int64_t shape[2];  // as stored in the file
    size_t offset;     // where its values start in the flat buffer
    int transposed;    // the file holds the transpose of our (shape[1], shape[0]) matrix
} HfTensor;

void hf_add(HfTensor* t, int* n, size_t offset, int ndim, int64_t rows, int64_t cols, int transposed, const char* fmt, int layer) {
    HfTensor* x = &t[(*n)++];
    snprintf(x->name, sizeof x->name, fmt, layer);
    x->ndim = ndim;
    x->shape[0] = rows;
    x->shape[1] = ndim == 2 ? cols : 1;
    x->offset = offset;
    x->transposed = transposed;
}

// Hugging Face's tensors of a model, in the flat buffer's order. Returns the count; free(*out).
int hf_tensors(const ModelConfig* mc, HfTensor** out) {
    ParamTable p = param_table(mc);
    int64_t C = mc->channels, V = mc->vocab_size, F = mc->ffn_hidden, KV = (int64_t)mc->num_kv_heads * (C / mc->num_heads);
    HfTensor* t = (HfTensor*)mallocCheck((5 + 12 * (size_t)mc->num_layers) * sizeof(HfTensor));
    int n = 0;
    if (mc->arch == ARCH_LLAMA) {
        hf_add(t, &n, param_named(&p, "wte")->offset, 2, V, C, 0, "model.embed_tokens.weight", 0);
        for (int l = 0; l < mc->num_layers; l++) {
            size_t qkv = param_layer(&p, l, LLAMA_QKVW)->offset, fc = param_layer(&p, l, LLAMA_FCW)->offset;
            hf_add(t, &n, param_layer(&p, l, LLAMA_LN1W)->offset, 1, C, 0, 0, "model.layers.%d.input_layernorm.weight", l);
            hf_add(t, &n, qkv, 2, C, C, 0, "model.layers.%d.self_attn.q_proj.weight", l);
            hf_add(t, &n, qkv + (size_t)(C * C), 2, KV, C, 0, "model.layers.%d.self_attn.k_proj.weight", l);
            hf_add(t, &n, qkv + (size_t)((C + KV) * C), 2, KV, C, 0, "model.layers.%d.self_attn.v_proj.weight", l);
            hf_add(t, &n, param_layer(&p, l, LLAMA_ATTPROJW)->offset, 2, C, C, 0, "model.layers.%d.self_attn.o_proj.weight", l);
            hf_add(t, &n, param_layer(&p, l, LLAMA_LN2W)->offset, 1, C, 0, 0, "model.layers.%d.post_attention_layernorm.weight", l);
            hf_add(t, &n, fc, 2, F, C, 0, "model.layers.%d.mlp.gate_proj.weight", l);
            hf_add(t, &n, fc + (size_t)(F * C), 2, F, C, 0, "model.layers.%d.mlp.up_proj.weight", l);
            hf_add(t, &n, param_layer(&p, l, LLAMA_FCPROJW)->offset, 2, C, F, 0, "model.layers.%d.mlp.down_proj.weight", l);
        }
        hf_add(t, &n, param_named(&p, "lnfw")->offset, 1, C, 0, 0, "model.norm.weight", 0);
        if (!mc->tied) hf_add(t, &n, param_named(&p, "lm_head")->offset, 2, V, C, 0, "lm_head.weight", 0);
    } else {
        hf_add(t, &n, param_named(&p, "wte")->offset, 2, V, C, 0, "transformer.wte.weight", 0);
        hf_add(t, &n, param_named(&p, "wpe")->offset, 2, mc->max_seq_len, C, 0, "transformer.wpe.weight", 0);
        for (int l = 0; l < mc->num_layers; l++) {
            #define GPT2_AT(which) param_layer(&p, l, which)->offset
            hf_add(t, &n, GPT2_AT(GPT2_LN1W), 1, C, 0, 0, "transformer.h.%d.ln_1.weight", l);
            hf_add(t, &n, GPT2_AT(GPT2_LN1B), 1, C, 0, 0, "transformer.h.%d.ln_1.bias", l);
            hf_add(t, &n, GPT2_AT(GPT2_QKVW), 2, C, 3 * C, 1, "transformer.h.%d.attn.c_attn.weight", l);
            hf_add(t, &n, GPT2_AT(GPT2_QKVB), 1, 3 * C, 0, 0, "transformer.h.%d.attn.c_attn.bias", l);
            hf_add(t, &n, GPT2_AT(GPT2_ATTPROJW), 2, C, C, 1, "transformer.h.%d.attn.c_proj.weight", l);
            hf_add(t, &n, GPT2_AT(GPT2_ATTPROJB), 1, C, 0, 0, "transformer.h.%d.attn.c_proj.bias", l);
            hf_add(t, &n, GPT2_AT(GPT2_LN2W), 1, C, 0, 0, "transformer.h.%d.ln_2.weight", l);
            hf_add(t, &n, GPT2_AT(GPT2_LN2B), 1, C, 0, 0, "transformer.h.%d.ln_2.bias", l);
            hf_add(t, &n, GPT2_AT(GPT2_FCW), 2, C, F, 1, "transformer.h.%d.mlp.c_fc.weight", l);
            hf_add(t, &n, GPT2_AT(GPT2_FCB), 1, F, 0, 0, "transformer.h.%d.mlp.c_fc.bias", l);
            hf_add(t, &n, GPT2_AT(GPT2_FCPROJW), 2, F, C, 1, "transformer.h.%d.mlp.c_proj.weight", l);
            hf_add(t, &n, GPT2_AT(GPT2_FCPROJB), 1, C, 0, 0, "transformer.h.%d.mlp.c_proj.bias", l);
            #undef GPT2_AT
        }
        hf_add(t, &n, param_named(&p, "lnfw")->offset, 1, C, 0, 0, "transformer.ln_f.weight", 0);
        hf_add(t, &n, param_named(&p, "lnfb")->offset, 1, C, 0, 0, "transformer.ln_f.bias", 0);
    }
    param_table_free(&p);
    *out = t;
    return n;
}

// --- config.json in ---------------------------------------------------------------

typedef struct { const char* path; const JsonValue* root; char* err; size_t errlen; } HfConfigFile;

// The value of `key`, or NULL when it is absent or null (transformers then uses its default).
const JsonValue* hf_key(const HfConfigFile* f, const char* key) {
    const JsonValue* v = json_member(f->root, key);
    return v && v->type != JSON_NULL ? v : NULL;
}

// An integer key in lo..hi; absent: `dflt`, or an error if required.
int hf_int(const HfConfigFile* f, const char* key, int required, int dflt, int lo, int hi, int* out) {
    const JsonValue* v = hf_key(f, key);
    if (v == NULL) {
        if (required) return fail(f->err, f->errlen, "'%s': missing key '%s'", f->path, key);
        *out = dflt;
        return 0;
    }
    if (v->type != JSON_NUMBER || v->number != floor(v->number) || v->number < lo || v->number > hi) {
        if (v->type == JSON_NUMBER) return fail(f->err, f->errlen, "'%s': key '%s' must be an integer in %d..%d, got %g", f->path, key, lo, hi, v->number);
        return fail(f->err, f->errlen, "'%s': key '%s' must be an integer in %d..%d, got %s", f->path, key, lo, hi, json_type_name(v->type));
    }
    *out = (int)v->number;
    return 0;
}

int hf_number(const HfConfigFile* f, const char* key, double dflt, double* out) {
    const JsonValue* v = hf_key(f, key);
    if (v == NULL) { *out = dflt; return 0; }
    if (v->type != JSON_NUMBER || !isfinite(v->number)) return fail(f->err, f->errlen, "'%s': key '%s' must be a finite number, got %s", f->path, key, json_type_name(v->type));
    *out = v->number;
    return 0;
}

int hf_bool(const HfConfigFile* f, const char* key, int dflt, int* out) {
    const JsonValue* v = hf_key(f, key);
    if (v == NULL) { *out = dflt; return 0; }
    if (v->type != JSON_BOOL) return fail(f->err, f->errlen, "'%s': key '%s' must be true or false, got %s", f->path, key, json_type_name(v->type));
    *out = v->boolean;
    return 0;
}

// A string key; absent: dflt, or an error if dflt is NULL.
int hf_string(const HfConfigFile* f, const char* key, const char* dflt, const char** out) {
    const JsonValue* v = hf_key(f, key);
    if (v == NULL) {
        if (dflt == NULL) return fail(f->err, f->errlen, "'%s': missing key '%s'", f->path, key);
        *out = dflt;
        return 0;
    }
    if (v->type != JSON_STRING) return fail(f->err, f->errlen, "'%s': key '%s' must be a string, got %s", f->path, key, json_type_name(v->type));
    *out = v->string;
    return 0;
}

// bos_token_id / eos_token_id: absent -> the config class's default; null -> none (-1); a
// list (several end tokens, as newer models have) -> its first.
int hf_token(const HfConfigFile* f, const char* key, int dflt, int* out) {
    const JsonValue* v = json_member(f->root, key);
    if (v == NULL) { *out = dflt; return 0; }
    if (v->type == JSON_ARRAY) v = v->count ? &v->items[0] : NULL;
    if (v == NULL || v->type == JSON_NULL) { *out = -1; return 0; }
    if (!json_is_count(v) || v->number >= MAX_VOCAB_SIZE) return fail(f->err, f->errlen, "'%s': key '%s' must be a token id (0..%d), null or a list of them", f->path, key, MAX_VOCAB_SIZE - 1);
    *out = (int)v->number;
    return 0;
}

// A boolean key that must have the value dstrain implements (`why` says what the other means).
int hf_require_bool(const HfConfigFile* f, const char* key, int dflt, int want, const char* why) {
    int v = dflt;
    if (hf_bool(f, key, dflt, &v)) return -1;
    if (v != want) return fail(f->err, f->errlen, "'%s': key '%s' is %s: %s", f->path, key, v ? "true" : "false", why);
    return 0;
}

// "architectures", when present, names the class the weights were saved from.
int hf_check_architecture(const HfConfigFile* f, const char* const* allowed, int n) {
    const JsonValue* v = hf_key(f, "architectures");
    if (v == NULL) return 0;
    if (v->type != JSON_ARRAY || v->count < 1 || v->items[0].type != JSON_STRING) return fail(f->err, f->errlen, "'%s': key 'architectures' must be a list of class names", f->path);
    for (int i = 0; i < n; i++) if (strcmp(v->items[0].string, allowed[i]) == 0) return 0;
    return fail(f->err, f->errlen, "'%s': key 'architectures' is [\"%s\"]: for this model_type only %s%s%s is supported", f->path, v->items[0].string,
                allowed[0], n > 1 ? " or " : "", n > 1 ? allowed[1] : "");
}

// LlamaForCausalLM (LLaMA, DeepSeek-LLM): LlamaConfig's keys, its defaults where transformers
// has one that a saved config may omit; the sizes must be given.
int hf_llama_config(const HfConfigFile* f, ModelConfig* mc) {
    static const char* const archs[] = {"LlamaForCausalLM"};
    int C, F, L, NH, KV, T, V, head_dim, tied, bos, eos;
    double eps, theta, std;
    const char* act;
    if (hf_check_architecture(f, archs, 1) ||
        hf_int(f, "hidden_size", 1, 0, 1, 1 << 16, &C) || hf_int(f, "intermediate_size", 1, 0, 1, 1 << 20, &F) ||
        hf_int(f, "num_hidden_layers", 1, 0, 1, 1024, &L) || hf_int(f, "num_attention_heads", 1, 0, 1, 1 << 16, &NH) ||
        hf_int(f, "max_position_embeddings", 1, 0, 1, 1 << 20, &T) || hf_int(f, "vocab_size", 1, 0, 1, MAX_VOCAB_SIZE, &V) ||
        hf_int(f, "num_key_value_heads", 0, NH, 1, 1 << 16, &KV)) return -1;
    if (C % NH) return fail(f->err, f->errlen, "'%s': key 'hidden_size' (%d) must be a multiple of 'num_attention_heads' (%d)", f->path, C, NH);
    if (NH % KV) return fail(f->err, f->errlen, "'%s': key 'num_key_value_heads' (%d) must divide 'num_attention_heads' (%d)", f->path, KV, NH);
    if (hf_int(f, "head_dim", 0, C / NH, 1, 1 << 16, &head_dim)) return -1;
    if (head_dim != C / NH) return fail(f->err, f->errlen, "'%s': key 'head_dim' is %d, not hidden_size / num_attention_heads = %d: a separate head size is not supported", f->path, head_dim, C / NH);
    if (hf_string(f, "hidden_act", "silu", &act)) return -1;
    if (strcmp(act, "silu") != 0) return fail(f->err, f->errlen, "'%s': key 'hidden_act' is \"%s\": only \"silu\" (LLaMA's SwiGLU) is supported", f->path, act);
    if (hf_require_bool(f, "attention_bias", 0, 0, "biases in the attention projections are not supported (LLaMA has none)") ||
        hf_require_bool(f, "mlp_bias", 0, 0, "biases in the MLP are not supported (LLaMA has none)")) return -1;
    if (hf_key(f, "rope_scaling")) return fail(f->err, f->errlen, "'%s': key 'rope_scaling' is set: scaled rotary embeddings are not supported yet (null expected)", f->path);
    // pretraining_tp > 1 only makes transformers compute the projections in that many slices,
    // to mimic the rounding of tensor-parallel pretraining: the same function, so it is ignored.
    if (hf_number(f, "rms_norm_eps", 1e-6, &eps) || hf_number(f, "rope_theta", 10000.0, &theta) ||
        hf_number(f, "initializer_range", 0.02, &std) || hf_bool(f, "tie_word_embeddings", 0, &tied) ||
        hf_token(f, "bos_token_id", 1, &bos) || hf_token(f, "eos_token_id", 2, &eos)) return -1;
    *mc = llama_config(L, NH, KV, C, F, T, V);
    mc->norm_eps = (float)eps; mc->rope_theta = (float)theta; mc->init_std = (float)std;
    mc->tied = tied; mc->bos_token = bos; mc->eos_token = eos;
    return 0;
}

// GPT2LMHeadModel: GPT2Config's keys. dstrain's GPT-2 is the original: tanh GELU, MLP 4C,
// attention scaled by 1/sqrt(head size), tied embeddings.
int hf_gpt2_config(const HfConfigFile* f, ModelConfig* mc) {
    static const char* const archs[] = {"GPT2LMHeadModel", "GPT2Model"};
    int C, L, NH, T, V, inner, bos, eos;
    double eps, std;
    const char* act;
    if (hf_check_architecture(f, archs, 2) ||
        hf_int(f, "n_embd", 1, 0, 1, 1 << 16, &C) || hf_int(f, "n_layer", 1, 0, 1, 1024, &L) ||
        hf_int(f, "n_head", 1, 0, 1, 1 << 16, &NH) || hf_int(f, "n_positions", 1, 0, 1, 1 << 20, &T) ||
        hf_int(f, "vocab_size", 1, 0, 1, MAX_VOCAB_SIZE, &V)) return -1;
    if (C % NH) return fail(f->err, f->errlen, "'%s': key 'n_embd' (%d) must be a multiple of 'n_head' (%d)", f->path, C, NH);
    if (hf_int(f, "n_inner", 0, 4 * C, 1, 1 << 20, &inner)) return -1;
    if (inner != 4 * C) return fail(f->err, f->errlen, "'%s': key 'n_inner' is %d: only null or 4 * n_embd = %d is supported", f->path, inner, 4 * C);
    if (hf_string(f, "activation_function", "gelu_new", &act)) return -1;
    if (strcmp(act, "gelu_new") != 0 && strcmp(act, "gelu_pytorch_tanh") != 0) {
        return fail(f->err, f->errlen, "'%s': key 'activation_function' is \"%s\": only the tanh GELU (\"gelu_new\" or \"gelu_pytorch_tanh\") is supported", f->path, act);
    }
    if (hf_require_bool(f, "scale_attn_weights", 1, 1, "unscaled attention is not supported") ||
        hf_require_bool(f, "scale_attn_by_inverse_layer_idx", 0, 0, "attention scaled by the layer index is not supported") ||
        hf_require_bool(f, "reorder_and_upcast_attn", 0, 0, "reordered, upcast attention is not supported") ||
        hf_require_bool(f, "add_cross_attention", 0, 0, "cross-attention is not supported") ||
        hf_require_bool(f, "tie_word_embeddings", 1, 1, "GPT-2's output layer is its token embedding (tied)")) return -1;
    if (hf_number(f, "layer_norm_epsilon", 1e-5, &eps) || hf_number(f, "initializer_range", 0.02, &std) ||
        hf_token(f, "bos_token_id", 50256, &bos) || hf_token(f, "eos_token_id", 50256, &eos)) return -1;
    *mc = gpt2_config(L, NH, C, T, V);
    mc->norm_eps = (float)eps; mc->init_std = (float)std; mc->bos_token = bos; mc->eos_token = eos;
    return 0;
}

// Reads DIR/config.json into mc (the vocabulary padded to a multiple of 128). Returns 0, or
// -1 with err naming the file and the key.
int hf_config_read(const char* dir, ModelConfig* mc, char* err, size_t errlen) {
    char path[PATH_LEN], jerr[400], merr[300];
    format_path(path, sizeof path, "%s/config.json", dir);
    char* text = read_text_file(path, err, errlen);
    if (text == NULL) return -1;
    JsonValue root;
    int rc = json_parse(text, &root, jerr, sizeof jerr);
    free(text);
    if (rc) return fail(err, errlen, "'%s': malformed JSON: %s", path, jerr);
    HfConfigFile f = {path, &root, err, errlen};
    const char* type = "";
    if (root.type != JSON_OBJECT) rc = fail(err, errlen, "'%s': the top level must be a JSON object, got %s", path, json_type_name(root.type));
    else rc = hf_string(&f, "model_type", NULL, &type);
    if (rc == 0) {
        if (strcmp(type, "llama") == 0) rc = hf_llama_config(&f, mc);
        else if (strcmp(type, "gpt2") == 0) rc = hf_gpt2_config(&f, mc);
        else rc = fail(err, errlen, "'%s': model_type \"%s\" is not supported (supported: \"llama\" (LlamaForCausalLM: LLaMA, DeepSeek-LLM) and \"gpt2\" (GPT2LMHeadModel))", path, type);
    }
    json_free(&root);
    if (rc == 0 && model_config_check(mc, merr, sizeof merr)) rc = fail(err, errlen, "'%s': %s", path, merr);
    return rc;
}

// --- weights in --------------------------------------------------------------------

// The name a tensor has in hf_tensors: GPT-2's, read without "transformer.", gets it.
void hf_canonical_name(const ModelConfig* mc, const char* name, char* out, size_t n) {
    int bare = mc->arch == ARCH_GPT2 && strncmp(name, "transformer.", 12) != 0 && strncmp(name, "lm_head.", 8) != 0;
    snprintf(out, n, "%s%s", bare ? "transformer." : "", name);
}

int str_ends_with(const char* s, const char* end) {
    size_t a = strlen(s), b = strlen(end);
    return a >= b && strcmp(s + a - b, end) == 0;
}

// Tensors files carry that are not parameters, or not separate ones: GPT-2's attention masks
// (h.{l}.attn.bias, attn.masked_bias), older LLaMA files' rotary inv_freq (recomputed from
// rope_theta), and lm_head.weight of a tied model (transformers ties it to the embedding).
int hf_ignored(const ModelConfig* mc, const char* name) {
    if (mc->tied && strcmp(name, "lm_head.weight") == 0) return 1;
    if (mc->arch == ARCH_GPT2) return strncmp(name, "transformer.h.", 14) == 0 && (str_ends_with(name, ".attn.bias") || str_ends_with(name, ".attn.masked_bias"));
    return strncmp(name, "model.layers.", 13) == 0 && str_ends_with(name, ".self_attn.rotary_emb.inv_freq");
}

// One tensor of a file into the flat buffer: named, shaped and typed as the model needs.
int hf_read_tensor(const SafeTensors* st, const StTensor* t, const ModelConfig* mc, const HfTensor* want, int nwant, char* seen, float* params, char* err, size_t errlen) {
    char name[PATH_LEN], have[128], need[128];
    hf_canonical_name(mc, t->name, name, sizeof name);
    int i = 0;
    while (i < nwant && strcmp(want[i].name, name) != 0) i++;
    if (i == nwant) {
        if (hf_ignored(mc, name)) return 0;
        return fail(err, errlen, "safetensors file '%s': tensor '%s' is not a parameter of the %s model that config.json describes (another architecture or configuration?)", st->path, t->name, arch_name(mc->arch));
    }
    const HfTensor* w = &want[i];
    if (seen[i]) return fail(err, errlen, "safetensors file '%s': tensor '%s' appears a second time (as '%s')", st->path, w->name, t->name);
    st_shape_text(t->shape, t->ndim, have, sizeof have);
    st_shape_text(w->shape, w->ndim, need, sizeof need);
    if (strcmp(have, need) != 0) return fail(err, errlen, "safetensors file '%s': tensor '%s' has shape %s, but config.json's model needs %s", st->path, t->name, have, need);
    float* dst = params + w->offset;
    if (!w->transposed) {
        if (safetensors_read_f32(st, t, dst, err, errlen)) return -1;
    } else { // the file's (rows, cols) is our (cols, rows)
        size_t rows = (size_t)w->shape[0], cols = (size_t)w->shape[1];
        float* tmp = (float*)mallocCheck(t->numel * sizeof(float));
        int rc = safetensors_read_f32(st, t, tmp, err, errlen);
        for (size_t r = 0; r < rows && rc == 0; r++) for (size_t c = 0; c < cols; c++) dst[c * rows + r] = tmp[r * cols + c];
        free(tmp);
        if (rc) return -1;
    }
    seen[i] = 1;
    return 0;
}

// Every tensor of one weight file; with an index (map), the tensors it places in this file
// (`file`) must be there.
int hf_read_file(const char* path, const char* file, const JsonValue* map, const char* index_path, const ModelConfig* mc,
                 const HfTensor* want, int nwant, char* seen, float* params, char* err, size_t errlen) {
    SafeTensors st;
    if (safetensors_open(&st, path, err, errlen)) return -1;
    int rc = 0;
    for (int i = 0; map && i < map->count && rc == 0; i++) {
        if (strcmp(map->items[i].string, file) == 0 && safetensors_find(&st, map->keys[i]) == NULL) {
            rc = fail(err, errlen, "'%s' places tensor '%s' in '%s', which has no such tensor", index_path, map->keys[i], path);
        }
    }
    for (int k = 0; k < st.count && rc == 0; k++) rc = hf_read_tensor(&st, &st.tensors[k], mc, want, nwant, seen, params, err, errlen);
    safetensors_close(&st);
    return rc;
}

// model.safetensors.index.json: its weight_map, and the files it names (each once, in order).
int hf_read_index(const char* path, JsonValue* index, const JsonValue** map, const char*** files, int* nfiles, char* err, size_t errlen) {
    char jerr[400];
    char* text = read_text_file(path, err, errlen);
    if (text == NULL) return -1;
    int rc = json_parse(text, index, jerr, sizeof jerr);
    free(text);
    if (rc) return fail(err, errlen, "'%s': malformed JSON: %s", path, jerr);
    *map = json_member(index, "weight_map");
    if (*map == NULL || (*map)->type != JSON_OBJECT) return fail(err, errlen, "'%s': no \"weight_map\" object", path);
    *files = (const char**)mallocCheck(((size_t)(*map)->count + 1) * sizeof(char*));
    *nfiles = 0;
    for (int i = 0; i < (*map)->count; i++) {
        const JsonValue* v = &(*map)->items[i];
        if (v->type != JSON_STRING || v->string[0] == '\0' || strchr(v->string, '/') || strcmp(v->string, "..") == 0) {
            return fail(err, errlen, "'%s': weight_map: tensor '%s' must name a file in the same folder", path, (*map)->keys[i]);
        }
        int k = 0;
        while (k < *nfiles && strcmp((*files)[k], v->string) != 0) k++;
        if (k == *nfiles) (*files)[(*nfiles)++] = v->string;
    }
    return 0;
}

// Reads DIR's weights (model.safetensors, or the shards model.safetensors.index.json lists)
// into params (model_num_params(mc) floats; the padding rows of wte and lm_head are 0).
// Returns 0, or -1 with err naming the file and the tensor.
int hf_weights_read(const char* dir, const ModelConfig* mc, float* params, char* err, size_t errlen) {
    char path[PATH_LEN], index_path[PATH_LEN], source[PATH_LEN + 32];
    format_path(index_path, sizeof index_path, "%s/model.safetensors.index.json", dir);
    JsonValue index;
    memset(&index, 0, sizeof index);
    const JsonValue* map = NULL;
    const char* single = "model.safetensors";
    const char** files = NULL;
    int nfiles = 1, rc = 0;
    if (file_size(index_path) >= 0) {
        rc = hf_read_index(index_path, &index, &map, &files, &nfiles, err, errlen);
        snprintf(source, sizeof source, "'%s' and its files", index_path);
    } else {
        format_path(path, sizeof path, "%s/model.safetensors", dir);
        if (file_size(path) < 0) return fail(err, errlen, "'%s': no model.safetensors or model.safetensors.index.json (only safetensors weights are read, not pytorch_model.bin)", dir);
        snprintf(source, sizeof source, "safetensors file '%s'", path);
    }
    HfTensor* want = NULL;
    int nwant = hf_tensors(mc, &want);
    char* seen = (char*)callocCheck((size_t)nwant, 1);
    memset(params, 0, model_num_params(mc) * sizeof(float));
    for (int f = 0; f < nfiles && rc == 0; f++) {
        const char* file = files ? files[f] : single;
        format_path(path, sizeof path, "%s/%s", dir, file);
        rc = hf_read_file(path, file, map, index_path, mc, want, nwant, seen, params, err, errlen);
    }
    for (int i = 0; i < nwant && rc == 0; i++) {
        char shape[128];
        st_shape_text(want[i].shape, want[i].ndim, shape, sizeof shape);
        if (!seen[i]) rc = fail(err, errlen, "%s: missing tensor '%s' (shape %s), which the %s model of config.json needs", source, want[i].name, shape, arch_name(mc->arch));
    }
    free(seen);
    free(want);
    free(files);
    json_free(&index);
    return rc;
}

// --- out ---------------------------------------------------------------------------

// The shortest decimal that reads back as the same float, as Python writes it ("1e-06", "0.02", "10000.0").
void json_float(float v, char* out, size_t n) {
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(out, n, "%.*g", digits, (double)v);
        if ((float)strtod(out, NULL) == v) break;
    }
    if (strpbrk(out, ".en") == NULL) strncat(out, ".0", n - strlen(out) - 1);
}

void json_token(int id, char* out, size_t n) {
    if (id >= 0) snprintf(out, n, "%d", id); else snprintf(out, n, "null");
}

// config.json as transformers writes it (keys sorted), with every key its config class
// reads, so that from_pretrained and AutoConfig load it. dstrain trains without dropout: the
// dropout keys are 0, the model as trained. "dstrain_export" marks the folder as one that a
// later export may replace.
void hf_config_text(const ModelConfig* mc, TextBuf* b) {
    char eps[32], theta[32], std[32], bos[16], eos[16];
    json_float(mc->norm_eps, eps, sizeof eps);
    json_float(mc->rope_theta, theta, sizeof theta);
    json_float(mc->init_std, std, sizeof std);
    json_token(mc->bos_token, bos, sizeof bos);
    json_token(mc->eos_token, eos, sizeof eos);
    if (mc->arch == ARCH_LLAMA) {
        tb_printf(b, "{\n  \"architectures\": [\n    \"LlamaForCausalLM\"\n  ],\n  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n"
                     "  \"bos_token_id\": %s,\n  \"dstrain_export\": true,\n  \"eos_token_id\": %s,\n  \"hidden_act\": \"silu\",\n"
                     "  \"hidden_size\": %d,\n  \"initializer_range\": %s,\n  \"intermediate_size\": %d,\n  \"max_position_embeddings\": %d,\n"
                     "  \"mlp_bias\": false,\n  \"model_type\": \"llama\",\n  \"num_attention_heads\": %d,\n  \"num_hidden_layers\": %d,\n"
                     "  \"num_key_value_heads\": %d,\n  \"pretraining_tp\": 1,\n  \"rms_norm_eps\": %s,\n  \"rope_scaling\": null,\n  \"rope_theta\": %s,\n"
                     "  \"tie_word_embeddings\": %s,\n  \"torch_dtype\": \"float32\",\n  \"use_cache\": true,\n  \"vocab_size\": %d\n}\n",
                  bos, eos, mc->channels, std, mc->ffn_hidden, mc->max_seq_len, mc->num_heads, mc->num_layers,
                  mc->num_kv_heads, eps, theta, mc->tied ? "true" : "false", mc->vocab_size);
    } else {
        tb_printf(b, "{\n  \"activation_function\": \"gelu_new\",\n  \"architectures\": [\n    \"GPT2LMHeadModel\"\n  ],\n  \"attn_pdrop\": 0.0,\n"
                     "  \"bos_token_id\": %s,\n  \"dstrain_export\": true,\n  \"embd_pdrop\": 0.0,\n  \"eos_token_id\": %s,\n  \"initializer_range\": %s,\n"
                     "  \"layer_norm_epsilon\": %s,\n  \"model_type\": \"gpt2\",\n  \"n_ctx\": %d,\n  \"n_embd\": %d,\n  \"n_head\": %d,\n  \"n_inner\": null,\n"
                     "  \"n_layer\": %d,\n  \"n_positions\": %d,\n  \"reorder_and_upcast_attn\": false,\n  \"resid_pdrop\": 0.0,\n"
                     "  \"scale_attn_by_inverse_layer_idx\": false,\n  \"scale_attn_weights\": true,\n  \"tie_word_embeddings\": true,\n"
                     "  \"torch_dtype\": \"float32\",\n  \"use_cache\": true,\n  \"vocab_size\": %d\n}\n",
                  bos, eos, std, eps, mc->max_seq_len, mc->channels, mc->num_heads, mc->num_layers, mc->max_seq_len, mc->vocab_size);
    }
}

// A small file, written and fsync'ed.
int write_text(const char* path, const char* text, char* err, size_t errlen) {
    FILE* f = fopen(path, "wb");
    if (f == NULL) return fail(err, errlen, "cannot create '%s': %s", path, strerror(errno));
    size_t n = strlen(text);
    int ok = fwrite(text, 1, n, f) == n && fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = 0;
    return ok ? 0 : fail(err, errlen, "cannot write '%s': %s", path, strerror(errno));
}

int copy_file(const char* from, const char* to, char* err, size_t errlen) {
    FILE* in = fopen(from, "rb");
    if (in == NULL) return fail(err, errlen, "cannot open '%s': %s", from, strerror(errno));
    FILE* out = fopen(to, "wb");
    if (out == NULL) { fclose(in); return fail(err, errlen, "cannot create '%s': %s", to, strerror(errno)); }
    char buf[1 << 16];
    size_t n;
    int ok = 1;
    while (ok && (n = fread(buf, 1, sizeof buf, in)) > 0) ok = fwrite(buf, 1, n, out) == n;
    ok = ok && !ferror(in) && fflush(out) == 0 && fsync(fileno(out)) == 0;
    fclose(in);
    if (fclose(out) != 0) ok = 0;
    return ok ? 0 : fail(err, errlen, "cannot copy '%s' to '%s': %s", from, to, strerror(errno));
}

// The weights: model.safetensors, or shards of at most max_shard_bytes (a tensor larger
// than that alone in one) and the index, as transformers' save_pretrained splits them.
int hf_write_weights(const char* folder, const ModelConfig* mc, const float* params, size_t max_shard_bytes, char* err, size_t errlen) {
    HfTensor* t = NULL;
    int n = hf_tensors(mc, &t), rc = 0;
    StWrite* w = (StWrite*)mallocCheck((size_t)n * sizeof(StWrite));
    int* first = (int*)mallocCheck(((size_t)n + 1) * sizeof(int)); // shard s holds tensors first[s] .. first[s + 1] - 1
    int shards = 0;
    size_t in_shard = 0, total = 0;
    for (int i = 0; i < n; i++) {
        w[i].name = t[i].name; w[i].ndim = t[i].ndim; w[i].shape[0] = t[i].shape[0]; w[i].shape[1] = t[i].shape[1];
        w[i].data = params + t[i].offset; w[i].transposed = t[i].transposed;
        size_t bytes = st_write_numel(&w[i]) * sizeof(float);
        if (i == 0 || in_shard + bytes > max_shard_bytes) { first[shards++] = i; in_shard = 0; }
        in_shard += bytes;
        total += bytes;
    }
    first[shards] = n;
    char path[PATH_LEN], file[64];
    if (shards == 1) {
        format_path(path, sizeof path, "%s/model.safetensors", folder);
        rc = safetensors_write(path, w, n, ST_F32, err, errlen);
    } else {
        TextBuf index = {NULL, 0, 0};
        tb_printf(&index, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n  \"weight_map\": {\n", total);
        for (int s = 0; s < shards && rc == 0; s++) {
            snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", s + 1, shards);
            format_path(path, sizeof path, "%s/%s", folder, file);
            rc = safetensors_write(path, w + first[s], first[s + 1] - first[s], ST_F32, err, errlen);
            for (int i = first[s]; i < first[s + 1]; i++) tb_printf(&index, "    \"%s\": \"%s\"%s\n", w[i].name, file, i + 1 < n ? "," : "");
        }
        tb_printf(&index, "  }\n}\n");
        format_path(path, sizeof path, "%s/model.safetensors.index.json", folder);
        if (rc == 0) rc = write_text(path, index.s, err, errlen);
        free(index.s);
    }
    free(first);
    free(w);
    free(t);
    return rc;
}

// The tokenizer files of src that exist (AutoTokenizer reads them from the export).
int hf_copy_tokenizer(const char* src, const char* folder, char* err, size_t errlen) {
    static const char* const names[] = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                                        "vocab.json", "merges.txt", "added_tokens.json"};
    char from[PATH_LEN], to[PATH_LEN];
    int copied = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        format_path(from, sizeof from, "%s/%s", src, names[i]);
        if (file_size(from) < 0) continue;
        format_path(to, sizeof to, "%s/%s", folder, names[i]);
        if (copy_file(from, to, err, errlen)) return -1;
        copied++;
    }
    if (copied == 0) fprintf(stderr, "warning: no tokenizer files (tokenizer.json, ...) in '%s': the export has no tokenizer\n", src);
    return 0;
}

// An export goes to a new or empty DIR, or replaces an earlier export of dstrain (its
// config.json has "dstrain_export", and it holds files only). Anything else is refused, not
// replaced, so that a mistyped path never deletes someone's files. Checked before training.
int hf_out_check(const char* dir, char* err, size_t errlen) {
    struct stat sb;
    if (stat(dir, &sb) != 0) return errno == ENOENT ? 0 : fail(err, errlen, "--hf-out '%s': %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return fail(err, errlen, "--hf-out '%s' exists and is not a directory", dir);
    DIR* d = opendir(dir);
    if (d == NULL) return fail(err, errlen, "--hf-out '%s': %s", dir, strerror(errno));
    int entries = 0, folders = 0;
    struct dirent* e;
    char path[PATH_LEN];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        entries++;
        format_path(path, sizeof path, "%s/%s", dir, e->d_name);
        if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) folders++;
    }
    closedir(d);
    if (entries == 0) return 0;
    format_path(path, sizeof path, "%s/config.json", dir);
    char* text = read_text_file(path, err, errlen);
    JsonValue root;
    char jerr[300];
    int ours = text && json_parse(text, &root, jerr, sizeof jerr) == 0;
    if (ours) { ours = json_member(&root, "dstrain_export") != NULL; json_free(&root); }
    free(text);
    if (!ours || folders) return fail(err, errlen, "--hf-out '%s' is not empty and not an earlier export of dstrain (which it would replace): choose a new or empty directory", dir);
    return 0;
}

// tmp becomes DIR: an empty DIR is removed, an earlier export moved aside and removed after.
int hf_commit(const char* tmp, const char* dir, char* err, size_t errlen) {
    char old[PATH_LEN], parent[PATH_LEN];
    format_path(old, sizeof old, "%s.old", dir);
    remove_folder(old); // a leftover of an interrupted export
    int replaced = 0;
    if (rmdir(dir) != 0 && errno != ENOENT) {
        if (rename(dir, old) != 0) return fail(err, errlen, "cannot rename '%s' to '%s': %s", dir, old, strerror(errno));
        replaced = 1;
    }
    if (rename(tmp, dir) != 0) return fail(err, errlen, "cannot rename '%s' to '%s': %s", tmp, dir, strerror(errno));
    format_path(parent, sizeof parent, "%s", dir);
    char* slash = strrchr(parent, '/');
    if (slash) { *slash = '\0'; fsync_path(slash == parent ? "/" : parent); } else fsync_path(".");
    if (replaced) remove_folder(old);
    return 0;
}

// Writes the model as a Hugging Face directory DIR: config.json, the weights in float32
// (model.safetensors, or shards of at most max_shard_bytes with model.safetensors.index.json;
// the V real rows of wte / lm_head; GPT-2's Conv1D weights transposed back), and the
// tokenizer files of tokenizer_src_dir if it is not NULL. Everything is written into DIR.tmp
// and renamed to DIR last, so an interrupted export never leaves a DIR that looks complete.
// DIR must be new, empty, or an earlier export of dstrain (hf_out_check). Returns 0, or -1
// with err naming the file.
int hf_write(const char* dir, const ModelConfig* mc, const float* params, size_t max_shard_bytes, const char* tokenizer_src_dir, char* err, size_t errlen) {
    char out[PATH_LEN], tmp[PATH_LEN], path[PATH_LEN];
    format_path(out, sizeof out, "%s", dir);
    for (size_t n = strlen(out); n > 1 && out[n - 1] == '/'; n--) out[n - 1] = '\0'; // "out/" names "out"
    if (hf_out_check(out, err, errlen)) return -1;
    format_path(tmp, sizeof tmp, "%s.tmp", out);
    remove_folder(tmp); // a leftover of an interrupted export
    make_dirs(tmp);
    TextBuf config = {NULL, 0, 0};
    hf_config_text(mc, &config);
    format_path(path, sizeof path, "%s/config.json", tmp);
    int rc = write_text(path, config.s, err, errlen);
    free(config.s);
    if (rc == 0) rc = hf_write_weights(tmp, mc, params, max_shard_bytes, err, errlen);
    if (rc == 0 && tokenizer_src_dir) rc = hf_copy_tokenizer(tokenizer_src_dir, tmp, err, errlen);
    if (rc == 0) { fsync_path(tmp); rc = hf_commit(tmp, out, err, errlen); }
    if (rc) remove_folder(tmp);
    return rc;
}

// ----------------------------------------------------------------------------
// logging: a JSON object per step in --log; on stdout a line per step, or, when the config
// sets steps_per_print (DeepSpeed's cadence, for runs of many steps), a line every that
// many steps (and at the first and last) summing up the steps since the last line.

enum { PHASE_FORWARD, PHASE_BACKWARD, PHASE_REDUCE, PHASE_OPTIMIZER, PHASE_DATA, NUM_PHASES };
static const char* PHASE_NAMES[NUM_PHASES] = {"forward", "backward", "reduce", "optimizer", "data"};

typedef struct {
    FILE* jsonl;
    double start_time;
    int64_t first_step;     // step the run started (or resumed) at, for the ETA
    int64_t print_every;    // steps between console lines (1: every step)
    // the steps since the last console line: how many, and the sums of their numbers
    int64_t window_steps;
    double window_loss, window_ms, window_tokens, window_phase_ms[NUM_PHASES];
} Logger;

void logger_open(Logger* lg, const char* path, int append, int64_t first_step, int64_t print_every) {
    memset(lg, 0, sizeof(*lg));
    lg->start_time = wall_seconds();
    lg->first_step = first_step;
    lg->print_every = print_every > 0 ? print_every : 1;
    if (path) lg->jsonl = fopenCheck(path, append ? "a" : "w");
}

typedef struct {
    int64_t step, total_steps;
    double epoch;      // epochs of data seen after this step (1.5: halfway through the second)
    int64_t tokens;    // tokens trained on so far, all ranks
    double loss, lr, grad_norm, ms, tokens_per_s;
    double phase_ms[NUM_PHASES]; // forward, backward, gradient reduction, optimizer, waiting for data
    int breakdown;     // wall_clock_breakdown: the phases other than data were timed after the device finished them
    int fp16;
    double loss_scale;
    int64_t skipped;
    int overflow;
    double mfu;        // model FLOPs utilisation in [0, 1]; NAN where unknown (CPU, unknown GPU)
    double memory_gb;  // device memory in use; NAN where not measured
    double utilisation; // the device's busy fraction in [0, 1] (NVML); NAN where not measured
    double bytes_sent; // by this rank in the step's collectives; NAN on one rank
} StepLog;

// The console line of the steps since the last one: the loss is their mean, ms and tok/s
// their rate; norm, scale and the rest are the last step's.
static void print_window(const Logger* lg, const StepLog* s) {
    double elapsed = wall_seconds() - lg->start_time, n = (double)lg->window_steps;
    int64_t done = s->step - lg->first_step;
    char eta[32], loss_note[48] = "";
    format_duration(done > 0 ? elapsed / done * (s->total_steps - s->step) : 0, eta, sizeof eta);
    if (lg->window_steps > 1) snprintf(loss_note, sizeof loss_note, " (mean of %lld steps)", (long long)lg->window_steps);
    printf("step %5lld/%lld | epoch %.2f | loss %.6f%s | lr %.3e | norm %8.4f | %7.1f ms | %7.0f tok/s | data %.1f ms", (long long)s->step,
           (long long)s->total_steps, s->epoch, lg->window_loss / n, loss_note, s->lr, s->grad_norm, lg->window_ms / n,
           lg->window_tokens / (lg->window_ms / 1e3), lg->window_phase_ms[PHASE_DATA] / n);
    if (s->fp16) printf(" | scale %g | skipped %lld%s", s->loss_scale, (long long)s->skipped, s->overflow ? " (overflow)" : "");
    if (isfinite(s->mfu)) printf(" | mfu %.1f%%", 100 * s->mfu);
    if (isfinite(s->memory_gb)) printf(" | mem %.2f GB", s->memory_gb);
    if (isfinite(s->utilisation)) printf(" | util %.0f%%", 100 * s->utilisation);
    if (isfinite(s->bytes_sent)) printf(" | sent %.1f MB", s->bytes_sent / 1e6);
    printf(" | eta %s\n", eta);
    if (s->breakdown) {
        printf("time (ms per step) |");
        for (int p = 0; p < NUM_PHASES; p++) printf(" %s: %.2f |", PHASE_NAMES[p], lg->window_phase_ms[p] / n);
        printf(" other: %.2f\n", (lg->window_ms - lg->window_phase_ms[PHASE_FORWARD] - lg->window_phase_ms[PHASE_BACKWARD] -
                                   lg->window_phase_ms[PHASE_REDUCE] - lg->window_phase_ms[PHASE_OPTIMIZER] - lg->window_phase_ms[PHASE_DATA]) / n);
    }
    fflush(stdout);
}

void log_step(Logger* lg, const StepLog* s) {
    lg->window_steps++;
    lg->window_loss += s->loss;
    lg->window_ms += s->ms;
    lg->window_tokens += s->tokens_per_s * s->ms / 1e3;
    for (int p = 0; p < NUM_PHASES; p++) lg->window_phase_ms[p] += s->phase_ms[p];
    if (s->step % lg->print_every == 0 || s->step == lg->first_step + 1 || s->step == s->total_steps) {
        print_window(lg, s);
        lg->window_steps = 0;
        lg->window_loss = lg->window_ms = lg->window_tokens = 0.0;
        for (int p = 0; p < NUM_PHASES; p++) lg->window_phase_ms[p] = 0.0;
    }
    if (lg->jsonl) {
        char norm[32] = "null"; // a skipped step has no norm
        if (isfinite(s->grad_norm)) snprintf(norm, sizeof norm, "%.9g", s->grad_norm);
        fprintf(lg->jsonl, "{\"type\": \"train\", \"step\": %lld, \"epoch\": %.6f, \"tokens\": %lld, \"loss\": %.9g, \"lr\": %.9g, \"grad_norm\": %s, "
                "\"ms\": %.3f, \"tokens_per_s\": %.1f, \"data_wait_ms\": %.3f", (long long)s->step, s->epoch, (long long)s->tokens, s->loss, s->lr, norm,
                s->ms, s->tokens_per_s, s->phase_ms[PHASE_DATA]);
        if (s->breakdown) {
            for (int p = 0; p < PHASE_DATA; p++) fprintf(lg->jsonl, ", \"%s_ms\": %.3f", PHASE_NAMES[p], s->phase_ms[p]);
        }
        if (s->fp16) fprintf(lg->jsonl, ", \"loss_scale\": %.9g, \"skipped\": %lld, \"overflow\": %s", s->loss_scale, (long long)s->skipped, s->overflow ? "true" : "false");
        if (isfinite(s->mfu)) fprintf(lg->jsonl, ", \"mfu\": %.4f", s->mfu);
        if (isfinite(s->memory_gb)) fprintf(lg->jsonl, ", \"memory_gb\": %.3f", s->memory_gb);
        if (isfinite(s->utilisation)) fprintf(lg->jsonl, ", \"utilisation\": %.3f", s->utilisation);
        if (isfinite(s->bytes_sent)) fprintf(lg->jsonl, ", \"bytes_sent\": %.0f", s->bytes_sent);
        fprintf(lg->jsonl, "}\n");
        fflush(lg->jsonl);
    }
}

void log_val(Logger* lg, int64_t step, double val_loss, int batches) {
    printf("step %5lld | val loss %.6f (%d batches)\n", (long long)step, val_loss, batches);
    fflush(stdout);
    if (lg->jsonl) {
        fprintf(lg->jsonl, "{\"type\": \"val\", \"step\": %lld, \"val_loss\": %.9g, \"batches\": %d}\n", (long long)step, val_loss, batches);
        fflush(lg->jsonl);
    }
}

// What one rank measured of its run (report_ranks gathers them). device: peak device memory
// in use and the device's mean utilisation (NAN: no NVML); host: peak RSS, and CPU time over
// wall time divided by the threads (100%: every thread busy the whole time).
typedef struct { double peak_memory_gb, utilisation, threads; } RankReport;

// rank 0 reports every rank's measurements of steps [first, last]
void log_rank(Logger* lg, int rank, const RankReport* r, int device, int64_t first, int64_t last) {
    if (device) {
        char util[64] = "n/a (no NVML)";
        if (isfinite(r->utilisation)) snprintf(util, sizeof util, "%.0f%% (NVML, mean of steps %lld-%lld)", 100 * r->utilisation, (long long)first, (long long)last);
        printf("rank %d: peak memory %.3f GB (device memory in use), utilisation %s\n", rank, r->peak_memory_gb, util);
    } else {
        printf("rank %d: peak memory %.3f GB (RSS), utilisation %.0f%% of %.0f thread(s) (CPU time over wall time, steps %lld-%lld)\n",
               rank, r->peak_memory_gb, 100 * r->utilisation, r->threads, (long long)first, (long long)last);
    }
    fflush(stdout);
    if (lg->jsonl) {
        char u[32] = "null";
        if (isfinite(r->utilisation)) snprintf(u, sizeof u, "%.4f", r->utilisation);
        fprintf(lg->jsonl, "{\"type\": \"rank\", \"rank\": %d, \"measured\": \"%s\", \"peak_memory_gb\": %.4f, \"utilisation\": %s",
                rank, device ? "device" : "host", r->peak_memory_gb, u);
        if (!device) fprintf(lg->jsonl, ", \"threads\": %.0f", r->threads);
        fprintf(lg->jsonl, ", \"first_step\": %lld, \"last_step\": %lld}\n", (long long)first, (long long)last);
        fflush(lg->jsonl);
    }
}

void logger_close(Logger* lg) {
    if (lg->jsonl) fclose(lg->jsonl);
    lg->jsonl = NULL;
}

// ============================================================================
// PART 3: plumbing
// The JSON reader, the command line, and how ranks find each other: MPI, the
// launchers' environment variables, a TCP rendezvous.
// ============================================================================

// ----------------------------------------------------------------------------
// json: a small reader for configuration files (its types are declared in part 1, where
// ds_config reads them). Errors carry line and column.

typedef struct {
    const char* text;
    size_t pos;
    int line, col;
    char* err;
    size_t errlen;
    int depth;
} JsonParser;

const char* json_type_name(JsonType t) {
    static const char* names[] = {"null", "a boolean", "a number", "a string", "an array", "an object"};
    return names[t];
}

int json_error(JsonParser* p, const char* what) {
    return fail(p->err, p->errlen, "line %d, column %d: %s", p->line, p->col, what);
}

void json_advance(JsonParser* p) {
    if (p->text[p->pos] == '\n') { p->line++; p->col = 1; } else { p->col++; }
    p->pos++;
}

void json_skip_space(JsonParser* p) {
    while (p->text[p->pos] == ' ' || p->text[p->pos] == '\t' || p->text[p->pos] == '\n' || p->text[p->pos] == '\r') {
        json_advance(p);
    }
}

int json_parse_value(JsonParser* p, JsonValue* v);

int json_parse_string(JsonParser* p, char** out) {
    json_advance(p); // opening quote
    size_t cap = 16, len = 0;
    char* s = (char*)mallocCheck(cap);
    for (;;) {
        char c = p->text[p->pos];
        if (c == '\0') { free(s); return json_error(p, "unterminated string"); }
        if ((unsigned char)c < 0x20) { free(s); return json_error(p, "control character inside a string"); }
        if (c == '"') { json_advance(p); break; }
        if (c == '\\') {
            json_advance(p);
            char e = p->text[p->pos];
            const char* simple = strchr("\"\\/bfnrt", e);
            if (e == '\0' || simple == NULL) {
                if (e == 'u') { free(s); return json_error(p, "\\u escapes are not supported in configuration strings"); }
                free(s);
                return json_error(p, "invalid escape in string");
            }
            static const char decoded[] = "\"\\/\b\f\n\r\t";
            c = decoded[simple - "\"\\/bfnrt"];
        }
        if (len + 2 > cap) { cap *= 2; char* t = (char*)realloc(s, cap); if (!t) { fatal("out of memory"); } s = t; }
        s[len++] = c;
        json_advance(p);
    }
    s[len] = '\0';
    *out = s;
    return 0;
}

int json_parse_number(JsonParser* p, JsonValue* v) {
    const char* start = p->text + p->pos;
    const char* q = start;
    // JSON grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
    if (*q == '-') q++;
    if (*q == '0') { q++; }
    else if (*q >= '1' && *q <= '9') { while (isdigit((unsigned char)*q)) q++; }
    else { return json_error(p, "invalid number"); }
    if (*q == '.') { q++; if (!isdigit((unsigned char)*q)) return json_error(p, "invalid number: digit expected after '.'"); while (isdigit((unsigned char)*q)) q++; }
    if (*q == 'e' || *q == 'E') {
        q++;
        if (*q == '+' || *q == '-') q++;
        if (!isdigit((unsigned char)*q)) return json_error(p, "invalid number: digit expected in exponent");
        while (isdigit((unsigned char)*q)) q++;
    }
    v->type = JSON_NUMBER;
    v->number = strtod(start, NULL);
    while (p->text + p->pos < q) json_advance(p);
    return 0;
}

int json_parse_literal(JsonParser* p, JsonValue* v) {
    static const struct { const char* word; JsonType type; int value; } literals[] = {
        {"true", JSON_BOOL, 1}, {"false", JSON_BOOL, 0}, {"null", JSON_NULL, 0},
        {"NaN", JSON_NUMBER, 0}, {"Infinity", JSON_NUMBER, 1}, {"-Infinity", JSON_NUMBER, -1},
    };
    for (size_t i = 0; i < sizeof(literals) / sizeof(literals[0]); i++) {
        size_t n = strlen(literals[i].word);
        if (strncmp(p->text + p->pos, literals[i].word, n) == 0 && !isalnum((unsigned char)p->text[p->pos + n])) {
            v->type = literals[i].type;
            v->boolean = literals[i].value;
            // Python's json.dump writes NaN and Infinity; accept them so they can be refused by key
            if (v->type == JSON_NUMBER) { v->number = literals[i].value == 0 ? NAN : literals[i].value * INFINITY; }
            for (size_t k = 0; k < n; k++) json_advance(p);
            return 0;
        }
    }
    return json_error(p, "unexpected character (expected a value: object, array, string, number, true, false or null)");
}

int json_parse_container(JsonParser* p, JsonValue* v, int is_object) {
    char close = is_object ? '}' : ']';
    v->type = is_object ? JSON_OBJECT : JSON_ARRAY;
    if (++p->depth > 64) return json_error(p, "nesting deeper than 64 levels");
    json_advance(p);
    json_skip_space(p);
    int cap = 0;
    if (p->text[p->pos] == close) { json_advance(p); p->depth--; return 0; }
    for (;;) {
        if (v->count == cap) {
            cap = cap ? cap * 2 : 8;
            v->items = (JsonValue*)realloc(v->items, cap * sizeof(JsonValue));
            if (is_object) v->keys = (char**)realloc(v->keys, cap * sizeof(char*));
            if (!v->items || (is_object && !v->keys)) fatal("out of memory");
        }
        JsonValue* item = &v->items[v->count];
        memset(item, 0, sizeof(*item));
        json_skip_space(p);
        if (is_object) {
            if (p->text[p->pos] != '"') return json_error(p, "expected a member name in double quotes");
            if (json_parse_string(p, &v->keys[v->count])) return -1;
            for (int i = 0; i < v->count; i++) {
                if (strcmp(v->keys[i], v->keys[v->count]) == 0) {
                    char msg[300]; snprintf(msg, sizeof msg, "duplicate key \"%s\"", v->keys[i]);
                    free(v->keys[v->count]);
                    return json_error(p, msg);
                }
            }
            json_skip_space(p);
            if (p->text[p->pos] != ':') { free(v->keys[v->count]); return json_error(p, "expected ':' after member name"); }
            json_advance(p);
            json_skip_space(p);
        }
        v->count++; // counted before parsing so json_free releases a partly parsed item
        if (json_parse_value(p, item)) return -1;
        json_skip_space(p);
        char c = p->text[p->pos];
        if (c == ',') { json_advance(p); continue; }
        if (c == close) { json_advance(p); p->depth--; return 0; }
        return json_error(p, is_object ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

int json_parse_value(JsonParser* p, JsonValue* v) {
    json_skip_space(p);
    v->line = p->line;
    v->col = p->col;
    char c = p->text[p->pos];
    if (c == '{' || c == '[') return json_parse_container(p, v, c == '{');
    if (c == '"') { v->type = JSON_STRING; return json_parse_string(p, &v->string); }
    if (c == '-' && p->text[p->pos + 1] == 'I') return json_parse_literal(p, v);
    if (c == '-' || isdigit((unsigned char)c)) return json_parse_number(p, v);
    if (c == '\0') return json_error(p, "unexpected end of input");
    return json_parse_literal(p, v);
}

void json_free(JsonValue* v) {
    free(v->string);
    for (int i = 0; i < v->count; i++) {
        json_free(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof(*v));
}

// Parses a whole document; trailing content is an error.
int json_parse(const char* text, JsonValue* out, char* err, size_t errlen) {
    JsonParser p = {text, 0, 1, 1, err, errlen, 0};
    memset(out, 0, sizeof(*out));
    if (json_parse_value(&p, out)) { json_free(out); return -1; }
    json_skip_space(&p);
    if (text[p.pos] != '\0') { json_free(out); return json_error(&p, "unexpected content after the end of the document"); }
    return 0;
}

// ----------------------------------------------------------------------------
// command line: the flags both trainers take. Every value is checked and a bad one
// names the flag. Flags that set a ds_config key override the file.

typedef struct {
    const char* config_path;   // -c / --deepspeed_config
    const char* train_data;
    const char* val_data;
    const char* tokenizer_path;
    const char* init_from;     // model.bin to start from instead of random weights
    const char* checkpoint_dir;
    const char* resume_from;   // checkpoint folder to resume from (default: checkpoint_dir)
    const char* log_path;
    double comm_timeout;       // seconds a collective may take before the run ends
    int64_t steps;
    uint64_t seed;
    int64_t save_every;        // 0: save only at the end
    int resume;
    int arch;                  // of a model from scratch: ARCH_GPT2 or ARCH_LLAMA
    int layers, heads, kv_heads, dim, ffn_dim, seq_len; // kv_heads, ffn_dim 0: the architecture's default
    int seq_len_given;         // --seq-len was given: the training sequence length for any model
    int64_t epochs;            // > 0: train this many passes over the data instead of --steps
    int steps_given;
    int plan_ranks;            // > 0: print the memory plan for this many ranks and exit
    int64_t val_every, val_batches, sample_tokens;
    int recompute;             // GPU: recompute GELU and LayerNorm outputs in backward
    const char* hf_model;      // Hugging Face model directory: configuration and initial weights
    const char* hf_out;        // write the trained model there as a Hugging Face directory
    int64_t hf_shard_size;     // largest safetensors file of --hf-out
    // ds_config overrides (NAN / -1: not given)
    double lr, weight_decay, grad_clip;
    int64_t micro_batch, grad_accum, train_batch_size;
} Options;

void options_defaults(Options* o) {
    memset(o, 0, sizeof(*o));
    o->train_data = "data/wikitext/wikitext_train_*.bin";
    o->val_data = "data/wikitext/wikitext_val_*.bin";
    o->tokenizer_path = "data/gpt2_tokenizer.bin";
    o->checkpoint_dir = "checkpoints";
    o->comm_timeout = 300;
    o->steps = 300;
    o->seed = 1337;
    o->arch = ARCH_GPT2;
    o->layers = 4; o->heads = 4; o->dim = 128; o->seq_len = 128;
    o->val_every = 50; o->val_batches = 16; o->sample_tokens = 64;
    o->lr = o->weight_decay = o->grad_clip = NAN;
    o->hf_shard_size = 5000000000; // transformers' save_pretrained: max_shard_size "5GB"
    o->micro_batch = o->grad_accum = o->train_batch_size = -1;
}

void print_usage(const char* prog) {
    Options d;
    options_defaults(&d);
    printf("usage: %s [options]\n\n"
           "Trains a GPT-2 model the way DeepSpeed does, from a ds_config.json.\n\n"
           "  -c, --deepspeed_config FILE  DeepSpeed config (default: built-in: DeepSpeed's defaults, micro batch 8)\n"
           "  --dataset NAME              the shards of `make data DATASET=NAME` (wikitext, wikitext-103, tinyshakespeare)\n"
           "  --train-data PATTERN        training shards, a glob (default %s)\n"
           "  --val-data PATTERN          validation shards (default %s; \"\" = none)\n"
           "  --tokenizer FILE            decode-only tokenizer for the sample, from data/prepare.py (default %s)\n"
           "  --steps N                   optimizer steps to train to (default %lld)\n"
           "  --epochs N                  instead of --steps: N passes over the training data (steps = N x sequences / train_batch_size)\n"
           "  --seed N                    seed for weights and data order (default %llu)\n"
           "  --arch gpt2|llama           architecture of a model from scratch (default gpt2)\n"
           "  --layers N --heads N --dim N --seq-len N\n"
           "                              model size (default %d, %d, %d, %d); ignored with --resume/--init-from/--hf-model, except\n"
           "                              --seq-len, the training sequence length for any model (default: the model's positions)\n"
           "  --kv-heads N --ffn-dim N    LLaMA from scratch: key/value heads (default: --heads), MLP width (default: 8/3 dim rounded up to 256)\n"
           "  --init-from FILE            start from the weights of a checkpoint's model.bin\n"
           "  --hf-model DIR              start from a Hugging Face model directory (config.json and safetensors of\n"
           "                              LlamaForCausalLM or GPT2LMHeadModel): its architecture, sizes and weights.\n"
           "                              With --resume the checkpoint's weights are used, DIR only gives --hf-out its tokenizer\n"
           "  --hf-out DIR                after training, also write the model as a Hugging Face directory (config.json,\n"
           "                              float32 safetensors, the tokenizer files of --hf-model); DIR must be new, empty,\n"
           "                              or an earlier export, which it replaces. With --steps 0: convert only, the weights\n"
           "                              of --hf-model, --init-from or --resume's checkpoint, without training\n"
           "  --hf-shard-size BYTES       largest safetensors file of --hf-out; larger models are sharded with an index\n"
           "                              (default %lld, save_pretrained's 5GB)\n"
           "  --checkpoint-dir DIR        where checkpoints go (default %s; \"\" = never save)\n"
           "  --save-every N              also save every N steps (default 0: only at the end)\n"
           "  --resume                    continue from DIR/latest, bit for bit (on any number of ranks)\n"
           "  --resume-from DIR           with --resume: read the checkpoint from DIR instead of --checkpoint-dir\n"
           "  --comm-timeout SECONDS      a collective or the ranks' rendezvous taking longer ends the run with an error (default %.0f)\n"
           "  --log FILE                  JSON-lines log, one object per step\n"
           "  --val-every N               validation loss every N steps (default %lld; 0 = only at the end)\n"
           "  --val-batches N             micro batches per validation, over all ranks (default %lld; 0 = the whole split)\n"
           "  --sample-tokens N           tokens sampled at the end (default %lld; 0 = none)\n"
           "  --recompute                 GPU: recompute GELU and LayerNorm outputs in backward (less memory)\n"
           "  overrides of ds_config keys:\n"
           "  --lr X                      optimizer.params.lr\n"
           "  --weight-decay X            optimizer.params.weight_decay\n"
           "  --grad-clip X               gradient_clipping\n"
           "  --micro-batch N             train_micro_batch_size_per_gpu\n"
           "  --grad-accum N              gradient_accumulation_steps\n"
           "  --train-batch-size N        train_batch_size\n"
           "  --plan N                    print the parameter count and the memory per rank of ZeRO stages 0, 1 and 2 on N ranks\n"
           "                              (model states next to DeepSpeed's formula, activations), without allocating; then exit\n"
           "  -h, --help                  this text\n",
           prog, d.train_data, d.val_data, d.tokenizer_path, (long long)d.steps, (unsigned long long)d.seed,
           d.layers, d.heads, d.dim, d.seq_len, (long long)d.hf_shard_size, d.checkpoint_dir, d.comm_timeout, (long long)d.val_every, (long long)d.val_batches, (long long)d.sample_tokens);
}

int64_t parse_int_flag(const char* flag, const char* value, int64_t min, int64_t max) {
    char* end;
    errno = 0;
    long long v = strtoll(value, &end, 10);
    if (value[0] == '\0' || *end != '\0' || errno != 0 || v < min || v > max) {
        fatal("%s: expected an integer in %lld..%lld, got '%s'", flag, (long long)min, (long long)max, value);
    }
    return v;
}

double parse_float_flag(const char* flag, const char* value, double min) {
    char* end;
    double v = strtod(value, &end);
    if (value[0] == '\0' || *end != '\0' || !isfinite(v) || v < min) fatal("%s: expected a number >= %g, got '%s'", flag, min, value);
    return v;
}

void parse_args(Options* o, int argc, char** argv) {
    options_defaults(o);
    for (int i = 1; i < argc; i++) {
        char flag[128];
        const char* arg = argv[i];
        const char* value = NULL;
        const char* eq = strchr(arg, '=');
        if (strncmp(arg, "--", 2) == 0 && eq) { // --flag=value
            snprintf(flag, sizeof flag, "%.*s", (int)(eq - arg), arg);
            value = eq + 1;
        } else {
            snprintf(flag, sizeof flag, "%s", arg);
        }
        const char* f = flag;
        if (strcmp(f, "-h") == 0 || strcmp(f, "--help") == 0) { print_usage(argv[0]); exit(0); }
        if (strcmp(f, "--resume") == 0) { if (value) fatal("--resume takes no value"); o->resume = 1; continue; }
        if (strcmp(f, "--recompute") == 0) { if (value) fatal("--recompute takes no value"); o->recompute = 1; continue; }
        if (f[0] != '-') fatal("unexpected argument '%s' (see --help)", arg);
        if (value == NULL) {
            if (i + 1 >= argc) fatal("%s needs a value (see --help)", f);
            value = argv[++i];
        }
        if (strcmp(f, "-c") == 0 || strcmp(f, "--deepspeed_config") == 0 || strcmp(f, "--deepspeed-config") == 0) o->config_path = value;
        else if (strcmp(f, "--dataset") == 0) { // the shards `make data DATASET=NAME` writes
            static char train[PATH_LEN], val[PATH_LEN];
            if (value[0] == '\0' || strchr(value, '/')) fatal("--dataset: expected a dataset name like wikitext-103, got '%s'", value);
            format_path(train, sizeof train, "data/%s/%s_train_*.bin", value, value);
            format_path(val, sizeof val, "data/%s/%s_val_*.bin", value, value);
            o->train_data = train;
            o->val_data = val;
        }
        else if (strcmp(f, "--train-data") == 0) o->train_data = value;
        else if (strcmp(f, "--val-data") == 0) o->val_data = value;
        else if (strcmp(f, "--tokenizer") == 0) o->tokenizer_path = value;
        else if (strcmp(f, "--init-from") == 0) o->init_from = value;
        else if (strcmp(f, "--hf-model") == 0) o->hf_model = value;
        else if (strcmp(f, "--hf-out") == 0) o->hf_out = value;
        else if (strcmp(f, "--hf-shard-size") == 0) o->hf_shard_size = parse_int_flag(f, value, 1, INT64_C(1) << 50);
        else if (strcmp(f, "--checkpoint-dir") == 0) o->checkpoint_dir = value;
        else if (strcmp(f, "--log") == 0) o->log_path = value;
        else if (strcmp(f, "--resume-from") == 0) o->resume_from = value;
        else if (strcmp(f, "--comm-timeout") == 0) o->comm_timeout = parse_float_flag(f, value, 1);
        else if (strcmp(f, "--steps") == 0) { o->steps = parse_int_flag(f, value, 0, INT64_C(1) << 40); o->steps_given = 1; }
        else if (strcmp(f, "--epochs") == 0) o->epochs = parse_int_flag(f, value, 1, 1 << 20);
        else if (strcmp(f, "--plan") == 0) o->plan_ranks = (int)parse_int_flag(f, value, 1, 1 << 20);
        else if (strcmp(f, "--arch") == 0) {
            if (strcmp(value, "gpt2") == 0) o->arch = ARCH_GPT2;
            else if (strcmp(value, "llama") == 0) o->arch = ARCH_LLAMA;
            else fatal("--arch: expected gpt2 or llama, got '%s'", value);
        }
        else if (strcmp(f, "--kv-heads") == 0) o->kv_heads = (int)parse_int_flag(f, value, 1, 1024);
        else if (strcmp(f, "--ffn-dim") == 0) o->ffn_dim = (int)parse_int_flag(f, value, 1, 1 << 20);
        else if (strcmp(f, "--seed") == 0) o->seed = (uint64_t)parse_int_flag(f, value, 0, INT64_MAX);
        else if (strcmp(f, "--save-every") == 0) o->save_every = parse_int_flag(f, value, 0, INT64_C(1) << 40);
        else if (strcmp(f, "--layers") == 0) o->layers = (int)parse_int_flag(f, value, 1, 1024);
        else if (strcmp(f, "--heads") == 0) o->heads = (int)parse_int_flag(f, value, 1, 1024);
        else if (strcmp(f, "--dim") == 0) o->dim = (int)parse_int_flag(f, value, 1, 1 << 16);
        else if (strcmp(f, "--seq-len") == 0) { o->seq_len = (int)parse_int_flag(f, value, 1, 1 << 20); o->seq_len_given = 1; }
        else if (strcmp(f, "--val-every") == 0) o->val_every = parse_int_flag(f, value, 0, INT64_C(1) << 40);
        else if (strcmp(f, "--val-batches") == 0) o->val_batches = parse_int_flag(f, value, 0, INT64_C(1) << 40);
        else if (strcmp(f, "--sample-tokens") == 0) o->sample_tokens = parse_int_flag(f, value, 0, 1 << 20);
        else if (strcmp(f, "--lr") == 0) o->lr = parse_float_flag(f, value, 0);
        else if (strcmp(f, "--weight-decay") == 0) o->weight_decay = parse_float_flag(f, value, 0);
        else if (strcmp(f, "--grad-clip") == 0) o->grad_clip = parse_float_flag(f, value, 0);
        else if (strcmp(f, "--micro-batch") == 0) o->micro_batch = parse_int_flag(f, value, 1, 1 << 20);
        else if (strcmp(f, "--grad-accum") == 0) o->grad_accum = parse_int_flag(f, value, 1, 1 << 20);
        else if (strcmp(f, "--train-batch-size") == 0) o->train_batch_size = parse_int_flag(f, value, 1, 1 << 30);
        else fatal("unknown option '%s' (see --help)", f);
    }
    if (o->heads > 0 && o->dim % o->heads != 0) fatal("--dim (%d) must be a multiple of --heads (%d)", o->dim, o->heads);
    if (o->kv_heads && o->heads % o->kv_heads) fatal("--kv-heads (%d) must divide --heads (%d)", o->kv_heads, o->heads);
    if (o->arch == ARCH_GPT2 && (o->kv_heads || o->ffn_dim)) fatal("--kv-heads and --ffn-dim are for --arch llama (GPT-2 has kv heads = heads, MLP width 4 x dim)");
    if (o->epochs && o->steps_given) fatal("--epochs and --steps both given: choose one (--epochs N trains N passes over the data)");
    if (o->hf_model && o->init_from) fatal("--hf-model and --init-from both give the initial weights: use one");
    if (o->hf_out && o->hf_out[0] == '\0') fatal("--hf-out: expected a directory, got ''");
}

// The effective DeepSpeed configuration: file (or built-in defaults), then flags,
// validated, with the batch sizes resolved for world_size ranks. Exits on error.
void load_effective_config(DSConfig* c, const Options* o, int world_size) {
    char err[1024];
    if (o->config_path) {
        if (ds_config_load(c, o->config_path, err, sizeof err)) fatal("%s", err);
    } else {
        ds_config_defaults(c);
        c->micro_batch = 8; // DeepSpeed requires a batch size; the built-in default is 8 sequences
    }
    if (!isnan(o->lr)) c->lr = o->lr;
    if (!isnan(o->weight_decay)) c->weight_decay = o->weight_decay;
    if (!isnan(o->grad_clip)) c->gradient_clipping = o->grad_clip;
    if (o->micro_batch != -1) c->micro_batch = o->micro_batch;
    if (o->grad_accum != -1) c->grad_accum = o->grad_accum;
    if (o->train_batch_size != -1) c->train_batch_size = o->train_batch_size;
    if (ds_config_validate(c, err, sizeof err)) fatal("%s", err);
    if (ds_resolve_batch(c, world_size, err, sizeof err)) fatal("%s", err);
}

void print_config(const DSConfig* c, int world_size) {
    printf("config: %s\n", c->path);
    printf("  batch: train_batch_size %lld = micro batch %lld x %lld accumulation steps x %d ranks\n",
           (long long)c->train_batch_size, (long long)c->micro_batch, (long long)c->grad_accum, world_size);
    printf("  optimizer: %s lr %g betas [%g, %g] eps %g weight_decay %g (%s)\n", c->optimizer_type, c->lr, c->betas[0], c->betas[1], c->eps,
           c->weight_decay, c->adam_w_mode ? "decoupled, adam_w_mode true" : "L2 added to the gradient, adam_w_mode false");
    if (c->scheduler == SCHED_NONE) printf("  scheduler: none (constant lr)\n");
    else printf("  scheduler: %s warmup_num_steps %lld (%s) warmup_min_lr %g warmup_max_lr %g total_num_steps %lld warmup_min_ratio %g cos_min_ratio %g\n",
                c->scheduler_type, (long long)c->warmup_num_steps, c->warmup_type_name, c->warmup_min_lr,
                !isnan(c->warmup_max_lr) ? c->warmup_max_lr : (c->scheduler == SCHED_WARMUP_DECAY_LR ? 0.001 : c->lr),
                (long long)c->total_num_steps, c->warmup_min_ratio, c->cos_min_ratio);
    printf("  gradient_clipping: %g%s\n", c->gradient_clipping, c->gradient_clipping > 0 ? "" : " (off)");
    if (c->fp16_enabled) {
        if (c->fp16_loss_scale == 0) printf("  fp16: dynamic loss scale 2^%lld, window %lld, hysteresis %lld%s, min %g\n", (long long)c->fp16_initial_scale_power,
                                            (long long)c->fp16_loss_scale_window, (long long)c->fp16_hysteresis, c->fp16_consecutive_hysteresis ? " (consecutive)" : "", c->fp16_min_loss_scale);
        else printf("  fp16: static loss scale %g\n", c->fp16_loss_scale);
    } else {
        printf("  precision: %s\n", c->bf16_enabled ? "bf16" : "fp32");
    }
    printf("  zero_optimization: stage %lld, reduce_bucket_size %lld, allgather_bucket_size %lld, overlap_comm %s\n",
           (long long)c->zero_stage, (long long)c->reduce_bucket_size, (long long)c->allgather_bucket_size, c->overlap_comm ? "true" : "false");
    if (c->steps_per_print) printf("  steps_per_print: %lld (the console's cadence; --log has every step)\n", (long long)c->steps_per_print);
    if (c->wall_clock_breakdown) printf("  wall_clock_breakdown: each phase timed after the device finished it\n");
}

// ----------------------------------------------------------------------------
// mpi: the backend for host buffers (the CPU trainer's ranks), in builds with MPI
// (-DUSE_MPI, by mpicc). Non-blocking collectives polled against the timeout.

#ifdef USE_MPI
#include <mpi.h>

// Waits for a non-blocking MPI operation, giving up after the timeout: a rank that died or
// took another path would otherwise leave the others waiting forever.
void mpi_wait_timeout(Comm* c, MPI_Request* req, const char* what) {
    double start = wall_seconds();
    for (long spins = 0;; spins++) {
        int done = 0;
        MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (done) return;
        if (wall_seconds() - start > c->timeout_s) {
            fprintf(stderr, "error: rank %d: collective '%s' did not complete within %.0f s (another rank died, hangs, or took a different path); ending the run\n",
                    c->rank, what, c->timeout_s);
            fflush(stderr);
            MPI_Abort(MPI_COMM_WORLD, 3);
            exit(3);
        }
        if (spins > 1000) usleep(100); // keep polling cheap once the wait is clearly long
    }
}

void mpi_allreduce_f64(Comm* c, double* v, int n, int op_max, const char* what) {
    MPI_Request req;
    MPI_Iallreduce(MPI_IN_PLACE, v, n, MPI_DOUBLE, op_max ? MPI_MAX : MPI_SUM, MPI_COMM_WORLD, &req);
    mpi_wait_timeout(c, &req, what);
    c->bytes_sent += 2 * ring_bytes(c, n * 8.0);
}

void mpi_allreduce_f32(Comm* c, float* buf, size_t n, const char* what) {
    for (size_t done = 0; done < n;) { // MPI counts are int: chunks of at most 2^30
        int chunk = (int)(n - done < (1u << 30) ? n - done : (1u << 30));
        MPI_Request req;
        MPI_Iallreduce(MPI_IN_PLACE, buf + done, chunk, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &req);
        mpi_wait_timeout(c, &req, what);
        done += chunk;
    }
    c->bytes_sent += 2 * ring_bytes(c, n * 4.0);
}

typedef struct { MPI_Request req; int* counts; } MpiRequest;

void* mpi_reduce_scatter_start(Comm* c, const float* send, float* recv, const size_t* counts, const char* what) {
    MpiRequest* r = (MpiRequest*)mallocCheck(sizeof(MpiRequest));
    r->counts = (int*)mallocCheck(c->world_size * sizeof(int));
    double total = 0;
    for (int k = 0; k < c->world_size; k++) {
        if (counts[k] > INT32_MAX) fatal("%s: %zu elements for one rank exceeds MPI's int count", what, counts[k]);
        r->counts[k] = (int)counts[k];
        total += counts[k];
    }
    MPI_Ireduce_scatter(send, recv, r->counts, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &r->req);
    c->bytes_sent += ring_bytes(c, total * 4.0);
    return r;
}

void mpi_wait(Comm* c, void* request, const char* what) {
    MpiRequest* r = (MpiRequest*)request;
    mpi_wait_timeout(c, &r->req, what);
    free(r->counts);
    free(r);
}

void mpi_allgather(Comm* c, void* buf, size_t elem_size, const size_t* counts, const size_t* displs, const char* what) {
    int* cnt = (int*)mallocCheck(c->world_size * sizeof(int));
    int* dsp = (int*)mallocCheck(c->world_size * sizeof(int));
    double total = 0;
    for (int k = 0; k < c->world_size; k++) {
        if (counts[k] * elem_size > INT32_MAX || displs[k] * elem_size > INT32_MAX) fatal("%s: chunk too large for MPI's int counts (lower allgather_bucket_size)", what);
        cnt[k] = (int)(counts[k] * elem_size);
        dsp[k] = (int)(displs[k] * elem_size);
        total += cnt[k];
    }
    MPI_Request req;
    MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, cnt, dsp, MPI_BYTE, MPI_COMM_WORLD, &req);
    mpi_wait_timeout(c, &req, what);
    c->bytes_sent += ring_bytes(c, total);
    free(cnt);
    free(dsp);
}

void mpi_barrier(Comm* c, const char* what) {
    MPI_Request req;
    MPI_Ibarrier(MPI_COMM_WORLD, &req);
    mpi_wait_timeout(c, &req, what);
}

void mpi_finalize(Comm* c) { (void)c; MPI_Finalize(); }

void comm_init_mpi(Comm* c, int* argc, char*** argv) {
    MPI_Init(argc, argv);
    Comm m = {"mpi", 0, 1, 0, 300.0, 0.0, NULL, mpi_allreduce_f64, mpi_allreduce_f32, mpi_reduce_scatter_start,
              mpi_wait, mpi_allgather, mpi_barrier, mpi_finalize};
    *c = m;
    MPI_Comm_rank(MPI_COMM_WORLD, &c->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c->world_size);
    MPI_Comm local;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &local);
    MPI_Comm_rank(local, &c->local_rank);
    MPI_Comm_free(&local);
}
#endif

// ----------------------------------------------------------------------------
// launchers: how the ranks learn who they are without MPI (torchrun, the DeepSpeed
// launcher, Slurm) and how they meet (a TCP rendezvous at MASTER_ADDR:MASTER_PORT).

// Rank, world size and local rank from the variables torchrun and the DeepSpeed launcher
// (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) set.
// Returns 0 when neither is present; -1 with err when the values are inconsistent.
typedef struct { int rank, world_size, local_rank; const char* source; } LaunchEnv;

int launch_env(LaunchEnv* e, char* err, size_t errlen) {
    static const char* sets[2][4] = {{"RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun/DeepSpeed launcher"},
                                     {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "Slurm"}};
    for (int i = 0; i < 2; i++) {
        const char *r = getenv(sets[i][0]), *w = getenv(sets[i][1]), *l = getenv(sets[i][2]);
        if (!r || !w) continue;
        char* end;
        long rank = strtol(r, &end, 10), world = *end ? -1 : strtol(w, &end, 10), local = l ? strtol(l, NULL, 10) : rank;
        if (*end || world < 1 || rank < 0 || rank >= world || local < 0) {
            return fail(err, errlen, "%s=%s, %s=%s: not a valid rank and world size (%s)", sets[i][0], r, sets[i][1], w, sets[i][3]);
        }
        e->rank = (int)rank; e->world_size = (int)world; e->local_rank = (int)local; e->source = sets[i][3];
        return 1;
    }
    return 0;
}

// Rendezvous over TCP: rank 0 listens on MASTER_ADDR:MASTER_PORT and sends `n` bytes (for
// example NCCL's unique id) to each of the other ranks, which connect to it. Bounded by
// timeout_s; an error names the address and what failed.
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

int tcp_wait(int fd, short events, double deadline) {
    struct pollfd p = {fd, events, 0};
    double left = deadline - wall_seconds();
    return left > 0 && poll(&p, 1, (int)(left * 1000) + 1) == 1 && (p.revents & events);
}

int tcp_broadcast(void* data, size_t n, int rank, int world, const char* addr, const char* port, double timeout_s, char* err, size_t errlen) {
    double deadline = wall_seconds() + timeout_s;
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    if (rank == 0) hints.ai_flags = AI_PASSIVE;
    if (getaddrinfo(rank == 0 ? NULL : addr, port, &hints, &ai) != 0 || ai == NULL) return fail(err, errlen, "rendezvous: cannot resolve MASTER_ADDR=%s MASTER_PORT=%s", addr, port);
    int rc = 0;
    if (rank == 0) {
        int srv = socket(ai->ai_family, ai->ai_socktype, 0), one = 1;
        setsockopt(srv, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (srv < 0 || bind(srv, ai->ai_addr, ai->ai_addrlen) != 0 || listen(srv, world) != 0) {
            rc = fail(err, errlen, "rendezvous: rank 0 cannot listen on port %s: %s", port, strerror(errno));
        }
        for (int served = 1; rc == 0 && served < world; served++) {
            if (!tcp_wait(srv, POLLIN, deadline)) { rc = fail(err, errlen, "rendezvous: only %d of %d ranks connected to port %s within %.0f s", served, world, port, timeout_s); break; }
            int c = accept(srv, NULL, NULL);
            if (c < 0 || write(c, data, n) != (ssize_t)n) rc = fail(err, errlen, "rendezvous: sending to a rank failed: %s", strerror(errno));
            if (c >= 0) close(c);
        }
        if (srv >= 0) close(srv);
    } else {
        size_t got = 0;
        while (rc == 0 && got < n) { // rank 0 may not listen yet: retry until the deadline
            int c = socket(ai->ai_family, ai->ai_socktype, 0);
            if (c >= 0 && connect(c, ai->ai_addr, ai->ai_addrlen) == 0) {
                while (got < n && tcp_wait(c, POLLIN, deadline)) {
                    ssize_t k = read(c, (char*)data + got, n - got);
                    if (k <= 0) break;
                    got += (size_t)k;
                }
            }
            if (c >= 0) close(c);
            if (got < n && wall_seconds() > deadline) rc = fail(err, errlen, "rendezvous: rank %d could not reach rank 0 at %s:%s within %.0f s", rank, addr, port, timeout_s);
            else if (got < n) { got = 0; usleep(100000); }
        }
    }
    freeaddrinfo(ai);
    return rc;
}

// The world size a launcher announced: mpirun (Open MPI, MPICH), torchrun and the
// DeepSpeed launcher (WORLD_SIZE), or Slurm (SLURM_NTASKS). 1 when run directly.
int launcher_world_size(const char** var) {
    const char* vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE", "SLURM_NTASKS"};
    for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
        const char* v = getenv(vars[i]);
        if (v && atoi(v) > 1) { *var = vars[i]; return atoi(v); }
    }
    return 1;
}

// mpirun (Open MPI, MPICH) or srun with PMIx started this process as an MPI rank
int launched_by_mpi(void) { return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK"); }

// Ranks that a launcher started but this build cannot join would each train alone and
// write the same files: the run ends instead, saying why (`reason`) and what to do.
void refuse_ranks(const char* reason) {
    const char* var = NULL;
    int launched = launcher_world_size(&var);
    if (launched > 1) fatal("%s=%d asks for several ranks, but this trainer %s", var, launched, reason);
}
#define NO_MPI_BUILD "was built without MPI (install Open MPI and rebuild with make)"

// The ranks of a trainer on host buffers (ModelOps.init_comm of the CPU trainer): mpirun
// (the MPI backend, in builds with MPI), or one. MPI has no rendezvous to bound: the
// timeout applies to the collectives (train_main sets it for every backend).
void comm_init_host(Comm* c, int* argc, char*** argv, double timeout_s) {
    (void)timeout_s;
#ifdef USE_MPI
    if (launched_by_mpi()) { comm_init_mpi(c, argc, argv); return; }
    refuse_ranks("takes its ranks from MPI: launch it with mpirun -np N");
#else
    (void)argc; (void)argv;
    refuse_ranks(NO_MPI_BUILD);
#endif
    comm_init_single(c);
}

// ============================================================================
// PART 4: the training driver
// What `./train_gpt` does, for either trainer and any number of ranks.
// ============================================================================

// ----------------------------------------------------------------------------
// training driver: what `./train_gpt` does, for any trainer and any number of ranks. A
// trainer supplies its model through ModelOps (the math) and its buffer operations; the
// driver does the rest (ZeRO and DeepSpeed's step order, data, validation, checkpoints,
// logs, sampling) the same way on every device.

typedef struct {
    const char* name;                                      // "CPU trainer (fp32)", printed at start
    // the ranks: this process's rank and the backend between them (host MPI, NCCL, ...)
    void (*init_comm)(Comm* c, int* argc, char*** argv, double timeout_s);
    void (*describe_run)(const DSConfig* c, const Comm* comm); // refuses what it cannot run, says what it does
    const BufferOps* buf;                                  // arithmetic on the optimizer's buffers
    void* (*build)(const ModelConfig* c, int B, int T, const Options* opt); // activations for (B, T) at most
    size_t (*num_params)(void* model);
    void* (*weights)(void* model, size_t* elem_size);      // the flat working weights (for the all-gather)
    void (*set_weights)(void* model, size_t offset, const float* master, size_t n); // fp32 master -> working weights
    // runs the model; with targets, adds the batch's mean loss to a sum that take_loss reads
    void (*forward)(void* model, const int* inputs, const int* targets, int B, int T);
    double (*take_loss)(void* model);                      // that sum, which starts anew (waits for the forwards)
    // gradients of the last forward (same inputs) for loss * dloss_scale, region by region into sink
    void (*backward)(void* model, const int* inputs, int B, int T, float dloss_scale, GradSink* sink);
    const float* (*probs)(void* model, int position);      // softmax of the last forward at (0, position), host
    void (*describe_memory)(void* model);                  // activations and other buffers of the model
    // for --plan, without allocating: bytes of activations for (B, T) (NAN: not known), and of a working weight
    double (*plan_memory)(const ModelConfig* c, int B, int T, const Options* opt, size_t* weight_bytes);
    // optional (NULL on the CPU): MFU, device memory in use and device utilisation (NAN:
    // unknown) after the step just taken; the driver keeps the peak memory and the mean utilisation
    void (*device_stats)(void* model, double step_seconds, double tokens_per_step, double* mfu, double* memory_gb, double* utilisation);
    // optional (NULL on the CPU): waits until the device has done the work issued so far
    // (wall_clock_breakdown times each phase after it, as DeepSpeed's timers synchronise)
    void (*synchronize)(void* model);
    void (*free)(void* model);
} ModelOps;

// Test-only fault injection, so overflow handling is tested through the whole trainer:
//   DSTRAIN_INJECT_INF="STEP[@TENSOR],..."   e.g. "3,7@layer0.qkvw"
// sets the first element of TENSOR's gradient (default wte) to +inf after the backward
// passes of optimizer step STEP (1-based), as an fp16 overflow would.
#define MAX_FAULTS 64
typedef struct {
    int count;
    int64_t steps[MAX_FAULTS];
    size_t index[MAX_FAULTS];
    char names[MAX_FAULTS][32];
} FaultPlan;

void fault_plan_parse(FaultPlan* f, const char* spec, const ModelConfig* mc) {
    memset(f, 0, sizeof(*f));
    if (spec == NULL || spec[0] == '\0') return;
    ParamTable table = param_table(mc);
    char* copy = strdup_check(spec);
    for (char* item = strtok(copy, ","); item; item = strtok(NULL, ",")) {
        if (f->count == MAX_FAULTS) fatal("DSTRAIN_INJECT_INF: more than %d faults", MAX_FAULTS);
        char* at = strchr(item, '@');
        const char* name = at ? at + 1 : "wte";
        if (at) *at = '\0';
        f->steps[f->count] = parse_int_flag("DSTRAIN_INJECT_INF (step)", item, 1, INT64_C(1) << 40);
        const ParamTensor* t = param_find(&table, name);
        if (t == NULL) fatal("DSTRAIN_INJECT_INF: no parameter tensor named '%s' (names: wte, wpe, layer0.qkvw, ..., lnfb)", name);
        f->index[f->count] = t->offset;
        snprintf(f->names[f->count], sizeof f->names[0], "%s", name);
        f->count++;
    }
    free(copy);
    param_table_free(&table);
}

// Injects the faults planned for optimizer step `step` (1-based) into this rank's averaged
// gradient g, which holds the parameters [lo, lo + n).
void fault_plan_apply(const FaultPlan* f, const BufferOps* buf, float* g, size_t lo, size_t n, int64_t step) {
    const float inf = INFINITY;
    for (int i = 0; i < f->count; i++) {
        if (f->steps[i] == step && f->index[i] >= lo && f->index[i] < lo + n) buf->from_host(g + (f->index[i] - lo), &inf, 1);
    }
}

// What each rank measures of its own run, for report_ranks at the end (dev/bench/scaling.sh
// reads it): peak memory over the whole run, and utilisation over the steps after the
// first (warm-up, as benchmarks time them; the only step of a one-step run).
//   host (ModelOps.device_stats NULL): peak RSS (getrusage's ru_maxrss: model states,
//     activations, the data pages read, MPI's buffers, the program), and CPU time (user +
//     system, every thread of the process) over wall time divided by the OpenMP threads.
//     A thread spinning for work, or a rank polling in a collective, counts as busy.
//   device: the largest memory_gb and the mean utilisation device_stats gave after each step.
typedef struct {
    int64_t from_step;        // first measured step
    double wall0, cpu0;       // host: seconds when it began
    double peak_memory_gb;    // device
    double busy_sum;          // device: sum of the utilisation samples, and their count
    int busy_samples;
} RankUsage;

// user + system CPU seconds of every thread of this process
double cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec * 1e-6 + u.ru_stime.tv_sec + u.ru_stime.tv_usec * 1e-6;
}

int openmp_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Measuring (again) from step next_step on; the peak memory is kept.
void rank_usage_start(RankUsage* u, int64_t next_step) {
    u->from_step = next_step;
    u->wall0 = wall_seconds();
    u->cpu0 = cpu_seconds();
    u->busy_sum = 0.0;
    u->busy_samples = 0;
}

// After each step: the device's samples; after the run's first step, when more follow, anew.
void rank_usage_step(RankUsage* u, const StepLog* s, int64_t first_step) {
    if (isfinite(s->memory_gb) && s->memory_gb > u->peak_memory_gb) u->peak_memory_gb = s->memory_gb;
    if (s->step == first_step + 1 && s->step < s->total_steps) { rank_usage_start(u, s->step + 1); return; }
    if (isfinite(s->utilisation)) { u->busy_sum += s->utilisation; u->busy_samples++; }
}

typedef struct {
    Options opt;
    DSConfig cfg;
    const ModelOps* ops;
    void* model;
    ModelConfig mc;
    size_t num_params;
    Comm comm;
    Zero zero;
    DataLoader train, val;
    int has_val;
    TrainState state;
    Rng rng;                                 // sampling
    Logger log;
    FaultPlan faults;                        // test-only, from DSTRAIN_INJECT_INF
    RankUsage usage;                         // this rank's memory and utilisation, for report_ranks
    int B, T, ga;
    int64_t last_saved;                      // step of the last checkpoint this run wrote
    double phase_ms[NUM_PHASES];             // this step's phases (PHASE_*)
} Trainer;

double ms_since(double t0) { return (wall_seconds() - t0) * 1e3; }

// Adds the time since *t0 to phase `phase` of this step and starts the next phase's clock.
// With wall_clock_breakdown the device finishes the phase's work first, so the time is the
// phase's own, not only its launch (the GPU trainer's host does not wait otherwise).
void phase_done(Trainer* tr, int phase, double* t0) {
    if (tr->cfg.wall_clock_breakdown && tr->ops->synchronize) tr->ops->synchronize(tr->model);
    double now = wall_seconds();
    tr->phase_ms[phase] += (now - *t0) * 1e3;
    *t0 = now;
}

// The updated master partitions become every rank's working weights: each rank writes its
// own, then an all-gather in chunks of allgather_bucket_size elements.
void zero_share_weights(Trainer* tr) {
    Zero* z = &tr->zero;
    size_t end = z->lo + z->n < tr->num_params ? z->lo + z->n : tr->num_params; // padding has no weight
    if (end > z->lo) tr->ops->set_weights(tr->model, z->lo, z->master, end - z->lo);
    if (z->stage == 0 || tr->comm.world_size == 1) return;
    size_t elem;
    char* w = (char*)tr->ops->weights(tr->model, &elem);
    int ws = tr->comm.world_size;
    size_t *counts = z->share_count, *displs = z->share_displ;
    size_t chunk = (size_t)tr->cfg.allgather_bucket_size;
    for (size_t lo = 0; lo < tr->num_params; lo += chunk) {
        size_t hi = lo + chunk < tr->num_params ? lo + chunk : tr->num_params;
        zero_shares(z, lo, hi, counts);
        for (int k = 0; k < ws; k++) displs[k] = z->part_start[k] > lo ? (z->part_start[k] < hi ? z->part_start[k] - lo : hi - lo) : 0;
        tr->comm.allgather(&tr->comm, w + lo * elem, elem, counts, displs, "all-gather of the updated weights");
    }
}

// DeepSpeed's step once the step's gradients are complete (doc/deepspeed.md section 4):
// reduce, overflow check and global norm combined over ranks, one unscale-and-clip
// factor, AdamW on this rank's partition, all-gather of the weights, schedule, scaler.
// mean_loss: the step's loss, the mean over its micro batches and the ranks. The gradient
// statistics are where the host waits for the device, once a step; the loss comes with them.
StepPlan optimizer_step(Trainer* tr, float* mean_loss) {
    Zero* z = &tr->zero;
    Comm* c = &tr->comm;
    double t0 = wall_seconds();
    float* g = zero_reduce_gradients(z);
    fault_plan_apply(&tr->faults, z->buf, g, z->lo, z->n, tr->state.step + 1);
    int nonfinite;
    double stats[3]; // overflows, sum of squares, loss: summed over the ranks in one all-reduce
    z->buf->stats(g, z->n, &nonfinite, &stats[1]);
    stats[0] = nonfinite;
    stats[2] = tr->ops->take_loss(tr->model) / (double)tr->cfg.grad_accum;
    if (c->world_size > 1) {
        if (z->stage > 0) c->allreduce_f64(c, stats, 3, 0, "all-reduce of the overflow count, the gradient norm and the loss");
        else c->allreduce_f64(c, &stats[2], 1, 0, "all-reduce of the loss"); // stage 0: every rank holds the same full gradient
    }
    *mean_loss = (float)(stats[2] / c->world_size);
    phase_done(tr, PHASE_REDUCE, &t0);
    StepPlan plan = step_plan(&tr->state, &tr->cfg, stats[0] != 0, stats[1]);
    if (!plan.skip) {
        z->buf->adamw(z->master, z->m, z->v, g, z->n, &plan, &tr->cfg);
        zero_share_weights(tr);
    }
    phase_done(tr, PHASE_OPTIMIZER, &t0);
    if (step_finish(&tr->state, &plan, c->rank == 0)) {
        fatal("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run. (fp16 overflowed at the minimum scale %g: "
              "this often happens when fine-tuning a model trained in bf16; try bf16, or a lower learning rate)", tr->state.scaler.min_scale);
    }
    return plan;
}

// One optimizer step: ga micro batches forward and backward, then the optimizer step.
// Returns the mean loss of the micro batches over all ranks.
// The phases' times are in tr->phase_ms.
float train_step(Trainer* tr, StepPlan* plan) {
    for (int p = 0; p < NUM_PHASES; p++) tr->phase_ms[p] = 0.0;
    zero_begin_step(&tr->zero);
    float loss_scale = (float)tr->state.scaler.scale;
    for (int micro = 0; micro < tr->ga; micro++) {
        dataloader_next(&tr->train);
        tr->phase_ms[PHASE_DATA] += tr->train.last_wait * 1e3;
        double t0 = wall_seconds();
        tr->ops->forward(tr->model, tr->train.inputs, tr->train.targets, tr->B, tr->T);
        phase_done(tr, PHASE_FORWARD, &t0);
        // DeepSpeed backpropagates loss * scale / ga: the gradient of the step's mean loss, scaled
        tr->ops->backward(tr->model, tr->train.inputs, tr->B, tr->T, loss_scale / tr->ga, &tr->zero.sink);
        zero_end_backward(&tr->zero);
        phase_done(tr, PHASE_BACKWARD, &t0);
    }
    float loss;
    *plan = optimizer_step(tr, &loss);
    return loss;
}

// Mean validation loss over --val-batches micro batches in total (the whole split with 0),
// shared among the ranks, so every world size validates on the same sequences.
float evaluate(Trainer* tr, int* batches_out) {
    DataLoader* v = &tr->val;
    int ws = tr->comm.world_size;
    int64_t available = (int64_t)(v->seqs_per_epoch / ((size_t)ws * v->B)); // per rank
    int64_t wanted = (tr->opt.val_batches + ws - 1) / ws;
    int64_t batches = tr->opt.val_batches > 0 && wanted < available ? wanted : available;
    dataloader_seek(v, 0, 0);
    for (int64_t i = 0; i < batches; i++) {
        dataloader_next(v);
        tr->ops->forward(tr->model, v->inputs, v->targets, v->B, v->T);
    }
    double sum = tr->ops->take_loss(tr->model);
    tr->comm.allreduce_f64(&tr->comm, &sum, 1, 0, "all-reduce of the validation loss");
    *batches_out = (int)(batches * ws);
    return (float)(sum / batches / tr->comm.world_size);
}

// Samples text from the model, starting from the end-of-text token (rank 0 only).
void sample_text(Trainer* tr, const Tokenizer* tok) {
    int n = (int)tr->opt.sample_tokens, T = tr->T, V = tr->mc.vocab_size;
    int* seq = (int*)mallocCheck(((size_t)n + 1) * sizeof(int));
    seq[0] = tok->eot_token;
    printf("sample (%d tokens, temperature 1):\n---\n", n);
    for (int i = 1; i <= n; i++) {
        int start = i > T ? i - T : 0, len = i - start; // the last T tokens of context
        tr->ops->forward(tr->model, seq + start, NULL, 1, len);
        const float* probs = tr->ops->probs(tr->model, len - 1);
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

// The full fp32 master weights in host memory on rank 0 (NULL on the other ranks, which
// must call it too: with ZeRO stages 1 and 2 the partitions are all-gathered first).
float* gather_master_weights(Trainer* tr, const char* what) {
    Zero* z = &tr->zero;
    Comm* c = &tr->comm;
    const BufferOps* b = z->buf;
    float* full = z->master;
    if (z->stage > 0) {
        full = (float*)b->alloc(z->padded * sizeof(float));
        b->copy(full + z->lo, z->master, z->n);
        c->allgather(c, full, sizeof(float), z->part_count, z->part_start, what);
    }
    float* host = NULL;
    if (c->rank == 0) {
        host = (float*)mallocCheck(tr->num_params * sizeof(float));
        b->to_host(host, full, tr->num_params);
    }
    if (full != z->master) b->release(full);
    return host;
}

// Every rank writes its partition of the fp32 master weights and Adam moments; rank 0
// also writes the full model (gathered from the partitions) and the training state.
// Stage 0 keeps everything on every rank, so rank 0 alone writes one optimizer file.
void save_checkpoint(Trainer* tr) {
    const char* dir = tr->opt.checkpoint_dir;
    Zero* z = &tr->zero;
    Comm* c = &tr->comm;
    const BufferOps* b = z->buf;
    double t0 = wall_seconds();
    char tmp[PATH_LEN], path[PATH_LEN];
    int files = z->stage == 0 ? 1 : c->world_size;
    if (c->rank == 0) checkpoint_begin(dir, tr->state.step, tmp, sizeof tmp);
    else format_path(tmp, sizeof tmp, "%s/step_%08lld.tmp", dir, (long long)tr->state.step);
    c->barrier(c, "checkpoint save (folder created)");
    float* full = gather_master_weights(tr, "all-gather of the master weights for a checkpoint"); // for model.bin
    if (c->rank < files) {
        float* host = (float*)mallocCheck(3 * z->n * sizeof(float));
        b->to_host(host, z->master, z->n);
        b->to_host(host + z->n, z->m, z->n);
        b->to_host(host + 2 * z->n, z->v, z->n);
        optim_file_write(tmp, c->rank, files, z->lo, z->n, tr->num_params, host, host + z->n, host + 2 * z->n);
        free(host);
    }
    if (c->rank == 0) {
        format_path(path, sizeof path, "%s/model.bin", tmp);
        model_file_write(path, &tr->mc, full, tr->num_params);
        CheckpointState s = {tr->state, tr->train.epoch, (int64_t)tr->train.cursor, tr->T, (int64_t)tr->train.num_seqs,
                             (int64_t)tr->train.global_batch, files, tr->opt.seed, tr->rng};
        format_path(path, sizeof path, "%s/state.bin", tmp);
        state_file_write(path, &s);
    }
    free(full);
    c->barrier(c, "checkpoint save (files written)");
    if (c->rank == 0) checkpoint_commit(dir, tr->state.step, tmp);
    c->barrier(c, "checkpoint save (committed)");
    tr->last_saved = tr->state.step;
    printf("saved checkpoint %s/step_%08lld (%d optimizer file(s), %.0f ms)\n", dir, (long long)tr->state.step, files, ms_since(t0));
}

// Every rank reads its own partition from however many files the checkpoint has, so a
// checkpoint saved on N ranks resumes on any M; then the weights are shared as after a step.
void load_checkpoint(Trainer* tr, const char* folder, const CheckpointState* s) {
    char err[1024];
    Zero* z = &tr->zero;
    float* host = (float*)mallocCheck(3 * z->n * sizeof(float));
    if (optim_files_read(folder, (int)s->world_size, z->lo, z->n, tr->num_params, host, host + z->n, host + 2 * z->n, err, sizeof err)) fatal("%s", err);
    z->buf->from_host(z->master, host, z->n);
    z->buf->from_host(z->m, host + z->n, z->n);
    z->buf->from_host(z->v, host + 2 * z->n, z->n);
    free(host);
    zero_share_weights(tr);
    if (s->seq_len != tr->T) fatal("checkpoint '%s' was trained with sequence length %lld, this run uses %d", folder, (long long)s->seq_len, tr->T);
    if (s->train_seqs != (int64_t)tr->train.num_seqs) {
        fatal("checkpoint '%s' was trained on data of %lld sequences, --train-data '%s' has %zu: resuming would not continue the same run",
              folder, (long long)s->train_seqs, tr->opt.train_data, tr->train.num_seqs);
    }
    if (s->seed != tr->opt.seed) printf("note: resuming with the checkpoint's seed %llu (not --seed %llu)\n", (unsigned long long)s->seed, (unsigned long long)tr->opt.seed);
    tr->opt.seed = s->seed;
    tr->train.seed = s->seed;
    if (s->global_batch != (int64_t)tr->train.global_batch) printf("note: the checkpoint used %lld sequences per step, this run %zu\n", (long long)s->global_batch, tr->train.global_batch);
    // counters and the scaler's state from the checkpoint, the scaler's settings from this run's config
    LossScaler configured = tr->state.scaler;
    tr->state = s->train;
    LossScaler* ls = &tr->state.scaler;
    ls->enabled = configured.enabled; ls->dynamic = configured.dynamic; ls->min_scale = configured.min_scale;
    ls->window = configured.window; ls->hysteresis = configured.hysteresis; ls->consecutive_hysteresis = configured.consecutive_hysteresis;
    if (!configured.dynamic) ls->scale = configured.scale;
    tr->rng = s->rng;
    size_t cursor = (size_t)s->loader_cursor;
    int64_t epoch = s->loader_epoch;
    if (cursor >= tr->train.seqs_per_epoch) { epoch++; cursor = 0; }
    dataloader_seek(&tr->train, epoch, cursor);
    printf("resumed from %s (%lld optimizer file(s)) on %d rank(s): step %lld, %lld optimizer updates, %lld skipped, loss scale %g, data epoch %lld position %zu\n",
           folder, (long long)s->world_size, tr->comm.world_size, (long long)tr->state.step, (long long)tr->state.adam_t, (long long)tr->state.skipped,
           ls->scale, (long long)epoch, cursor);
}

// Fresh weights (initialisation from the seed, or a model file) on every rank, the same everywhere.
void init_weights(Trainer* tr) {
    char err[1024];
    Zero* z = &tr->zero;
    float* full = (float*)callocCheck(z->padded, sizeof(float));
    if (tr->opt.init_from) {
        if (model_file_read(tr->opt.init_from, full, tr->num_params, err, sizeof err)) fatal("%s", err);
        printf("weights: from %s\n", tr->opt.init_from);
    } else if (tr->opt.hf_model) {
        if (hf_weights_read(tr->opt.hf_model, &tr->mc, full, err, sizeof err)) fatal("%s", err);
        printf("weights: from the Hugging Face model %s\n", tr->opt.hf_model);
    } else {
        model_init_params(full, &tr->mc, tr->opt.seed);
        printf("weights: %s initialisation (normal, std %g), seed %llu\n", tr->mc.arch == ARCH_LLAMA ? "LLaMA" : "GPT-2", tr->mc.init_std, (unsigned long long)tr->opt.seed);
    }
    z->buf->from_host(z->master, full + z->lo, z->n);
    free(full);
    zero_share_weights(tr);
}

// The model configuration: from the checkpoint being resumed, a model file, or the flags.
ModelConfig choose_model_config(Trainer* tr, char* resume_folder, size_t n, CheckpointState* resume_state) {
    char err[1024], path[PATH_LEN];
    size_t file_params;
    const Options* o = &tr->opt;
    ModelConfig mc = gpt2_config(o->layers, o->heads, o->dim, o->seq_len, GPT2_VOCAB_SIZE);
    if (o->arch == ARCH_LLAMA) { // LLaMA's default MLP width: 2/3 of 4 x dim, rounded up to a multiple of 256
        int ffn = o->ffn_dim ? o->ffn_dim : (8 * o->dim / 3 + 255) / 256 * 256;
        mc = llama_config(o->layers, o->heads, o->kv_heads ? o->kv_heads : o->heads, o->dim, ffn, o->seq_len, GPT2_VOCAB_SIZE);
    }
    if (tr->opt.resume) {
        const char* dir = tr->opt.resume_from ? tr->opt.resume_from : tr->opt.checkpoint_dir;
        if (dir[0] == '\0') fatal("--resume needs --checkpoint-dir or --resume-from");
        if (checkpoint_latest(dir, resume_folder, n, err, sizeof err)) fatal("%s", err);
        format_path(path, sizeof path, "%s/state.bin", resume_folder);
        if (state_file_read(path, resume_state, err, sizeof err)) fatal("%s", err);
        format_path(path, sizeof path, "%s/model.bin", resume_folder);
        if (model_file_config(path, &mc, &file_params, err, sizeof err)) fatal("%s", err);
        if (tr->opt.hf_model) printf("note: resuming: the weights are the checkpoint's; --hf-model %s only gives --hf-out its tokenizer\n", tr->opt.hf_model);
    } else if (tr->opt.init_from) {
        if (model_file_config(tr->opt.init_from, &mc, &file_params, err, sizeof err)) fatal("%s", err);
    } else if (tr->opt.hf_model) {
        if (hf_config_read(tr->opt.hf_model, &mc, err, sizeof err)) fatal("%s", err);
    }
    if (model_config_check(&mc, err, sizeof err)) fatal("model: %s", err);
    return mc;
}

void open_data(Trainer* tr) {
    char err[1024];
    int rank = tr->comm.rank, ws = tr->comm.world_size;
    if (dataloader_init(&tr->train, tr->opt.train_data, tr->B, tr->T, rank, ws, (size_t)tr->cfg.train_batch_size, 1, tr->opt.seed, tr->mc.vocab_size, err, sizeof err)) fatal("%s", err);
    printf("train data: %s: %d shard(s), %zu tokens, %zu sequences of %d; %zu steps per epoch\n", tr->opt.train_data, tr->train.num_shards,
           dataloader_num_tokens(&tr->train), tr->train.num_seqs, tr->T, tr->train.seqs_per_epoch / (size_t)tr->cfg.train_batch_size);
    tr->has_val = tr->opt.val_data[0] != '\0';
    if (tr->has_val) {
        if (dataloader_init(&tr->val, tr->opt.val_data, tr->B, tr->T, rank, ws, (size_t)tr->B * ws, 0, 0, tr->mc.vocab_size, err, sizeof err)) fatal("%s", err);
        printf("val data: %s: %zu tokens\n", tr->opt.val_data, dataloader_num_tokens(&tr->val));
    }
}

void log_train_step(Trainer* tr, const StepPlan* plan, float loss, double ms) {
    int64_t tokens_per_step = tr->cfg.train_batch_size * tr->T;
    double steps_per_epoch = (double)tr->train.seqs_per_epoch / (double)tr->cfg.train_batch_size;
    StepLog sl = {tr->state.step, tr->opt.steps, tr->state.step / steps_per_epoch, tr->state.step * tokens_per_step, loss, plan->lr,
                  plan->grad_norm, ms, tokens_per_step / (ms / 1e3), {0}, tr->cfg.wall_clock_breakdown, tr->cfg.fp16_enabled, plan->scale,
                  tr->state.skipped, plan->overflow, NAN, NAN, NAN, tr->comm.world_size > 1 ? tr->comm.bytes_sent : NAN};
    memcpy(sl.phase_ms, tr->phase_ms, sizeof sl.phase_ms);
    if (tr->ops->device_stats) tr->ops->device_stats(tr->model, ms / 1e3, (double)tokens_per_step, &sl.mfu, &sl.memory_gb, &sl.utilisation);
    rank_usage_step(&tr->usage, &sl, tr->log.first_step);
    log_step(&tr->log, &sl);
}

// After the training loop: every rank's peak memory and utilisation (RankUsage), gathered
// through the host all-reduce (each rank fills its own three slots, the others hold zeros),
// printed by rank 0 one line per rank and logged as {"type": "rank"} records.
void report_ranks(Trainer* tr) {
    RankUsage* u = &tr->usage;
    Comm* c = &tr->comm;
    int device = tr->ops->device_stats != NULL, n = 3 * c->world_size;
    double* all = (double*)callocCheck(n, sizeof(double)); // (world, 3): peak memory GB, utilisation, threads
    double* mine = all + 3 * c->rank;
    if (device) {
        mine[0] = u->peak_memory_gb;
        mine[1] = u->busy_samples ? u->busy_sum / u->busy_samples : NAN;
    } else {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        mine[0] = ru.ru_maxrss * 1024.0 / 1e9; // ru_maxrss is in KiB on Linux
        double cpu = cpu_seconds() - u->cpu0, wall = wall_seconds() - u->wall0; // the CPU interval inside the wall one
        mine[2] = openmp_threads();
        mine[1] = cpu / wall / mine[2];
    }
    for (int i = 0; i < n; i += COMM_MAX_SCALARS) {
        c->allreduce_f64(c, all + i, n - i < COMM_MAX_SCALARS ? n - i : COMM_MAX_SCALARS, 0, "all-reduce of the ranks' memory and utilisation");
    }
    for (int r = 0; c->rank == 0 && r < c->world_size; r++) {
        RankReport rep = {all[3 * r], all[3 * r + 1], all[3 * r + 2]};
        log_rank(&tr->log, r, &rep, device, u->from_step, tr->state.step);
    }
    free(all);
}

// --hf-out after training: the full fp32 master weights as a Hugging Face directory. Every
// rank joins the all-gather; rank 0 writes, and the others do not wait for it (no barrier:
// writing a large model may take longer than the collectives' timeout).
void export_hf(Trainer* tr) {
    char err[1024];
    double t0 = wall_seconds();
    float* host = gather_master_weights(tr, "all-gather of the master weights for --hf-out");
    if (host == NULL) return;
    if (hf_write(tr->opt.hf_out, &tr->mc, host, (size_t)tr->opt.hf_shard_size, tr->opt.hf_model, err, sizeof err)) fatal("%s", err);
    free(host);
    printf("wrote the Hugging Face model %s (step %lld, %.0f ms)\n", tr->opt.hf_out, (long long)tr->state.step, ms_since(t0));
}

// --steps 0 --hf-out DIR: converts weights (--hf-model, --init-from, or --resume's checkpoint)
// to a Hugging Face directory, in one process, without building the model or opening data,
// so that it works on any machine for any model size.
int convert_to_hf(const Options* o) {
    char err[1024], folder[PATH_LEN], path[PATH_LEN];
    ModelConfig mc;
    size_t n;
    const char* from = o->init_from;
    refuse_ranks("converts in one process with --steps 0 --hf-out: run it without a launcher");
    if (o->resume) {
        const char* dir = o->resume_from ? o->resume_from : o->checkpoint_dir;
        if (dir[0] == '\0') fatal("--resume needs --checkpoint-dir or --resume-from");
        if (checkpoint_latest(dir, folder, sizeof folder, err, sizeof err)) fatal("%s", err);
        format_path(path, sizeof path, "%s/model.bin", folder);
        from = path;
    } else if (from == NULL && o->hf_model == NULL) {
        fatal("--steps 0 --hf-out converts weights: give --hf-model DIR, --init-from FILE or --resume");
    }
    float* params;
    if (from) {
        if (model_file_config(from, &mc, &n, err, sizeof err)) fatal("%s", err);
        params = (float*)mallocCheck(n * sizeof(float));
        if (model_file_read(from, params, n, err, sizeof err)) fatal("%s", err);
    } else {
        from = o->hf_model;
        if (hf_config_read(from, &mc, err, sizeof err)) fatal("%s", err);
        params = (float*)mallocCheck(model_num_params(&mc) * sizeof(float));
        if (hf_weights_read(from, &mc, params, err, sizeof err)) fatal("%s", err);
    }
    if (hf_write(o->hf_out, &mc, params, (size_t)o->hf_shard_size, o->hf_model, err, sizeof err)) fatal("%s", err);
    printf("converted %s (%s, %d layers, %d channels, vocabulary %d: %.2fM parameters) to the Hugging Face model %s\n", from, arch_name(mc.arch),
           mc.num_layers, mc.channels, mc.vocab_size, model_num_params(&mc) / 1e6, o->hf_out);
    free(params);
    return 0;
}

// The regions of gradients the model hands to ZeRO, from the end of the buffer to its start:
// lm_head (untied), the final norm, the layers, the positions (GPT-2), the token embedding.
// A tied embedding receives the classifier's gradient first and the encoder's last, so it
// is held across the backward pass (embedding_n); region_max is the largest of the others.
void gradient_regions(const ModelConfig* mc, size_t* embedding_n, size_t* region_max) {
    ParamTable p = param_table(mc);
    size_t layer = 0, final_norm = 0, largest = 0;
    for (int i = 0; i < p.per_layer; i++) layer += param_layer(&p, 0, i)->size;
    for (int i = p.first_layer + mc->num_layers * p.per_layer; i < p.count; i++) {
        const ParamTensor* t = &p.tensors[i];
        if (strcmp(t->name, "lm_head") == 0) largest = t->size > largest ? t->size : largest;
        else final_norm += t->size;
    }
    const ParamTensor* wpe = param_find(&p, "wpe");
    size_t candidates[4] = {layer, final_norm, wpe ? wpe->size : 0, mc->tied ? 0 : param_named(&p, "wte")->size};
    for (int i = 0; i < 4; i++) largest = candidates[i] > largest ? candidates[i] : largest;
    *embedding_n = mc->tied ? param_named(&p, "wte")->size : 0;
    *region_max = largest;
    param_table_free(&p);
}

// The sequence length this run trains on: --seq-len, else the resumed run's, else the
// model's positions (a model from scratch has --seq-len positions).
int training_seq_len(const Options* o, const ModelConfig* mc, const CheckpointState* resumed) {
    int T = o->seq_len_given ? o->seq_len : resumed ? (int)resumed->seq_len : mc->max_seq_len;
    if (T > mc->max_seq_len) fatal("--seq-len %d exceeds the model's %d positions (n_positions / max_position_embeddings)", T, mc->max_seq_len);
    return T;
}

void describe_model(const ModelConfig* c, int T) {
    if (c->arch == ARCH_LLAMA) {
        printf("model: LLaMA, %d layers, %d heads (%d key/value heads), %d channels, MLP %d, %d positions (rope_theta %g), vocabulary %d (padded %d), lm_head %s: %.2fM parameters\n",
               c->num_layers, c->num_heads, c->num_kv_heads, c->channels, c->ffn_hidden, c->max_seq_len, c->rope_theta, c->vocab_size, c->padded_vocab_size,
               c->tied ? "tied" : "untied", model_num_params(c) / 1e6);
    } else {
        printf("model: GPT-2, %d layers, %d heads, %d channels, %d positions, vocabulary %d (padded %d): %.2fM parameters\n",
               c->num_layers, c->num_heads, c->channels, c->max_seq_len, c->vocab_size, c->padded_vocab_size, model_num_params(c) / 1e6);
    }
    printf("sequence length: %d\n", T);
}

// --plan N: what a rank holds for ZeRO stages 0, 1 and 2 on N ranks, from the configuration
// alone, next to DeepSpeed's formula for mixed precision with Adam (ZeRO paper, K = 12:
// 16-bit weights and gradients, fp32 master weights and two moments): 16 Psi,
// 4 Psi + 12 Psi / N, 2 Psi + 14 Psi / N. dstrain keeps gradients in fp32.
void print_plan(const Trainer* tr, int N) {
    const ModelConfig* mc = &tr->mc;
    const DSConfig* c = &tr->cfg;
    size_t weight_bytes, embedding_n, region_max, P = model_num_params(mc);
    double act = tr->ops->plan_memory(mc, tr->B, tr->T, &tr->opt, &weight_bytes), GB = 1e9, psi = (double)P;
    gradient_regions(mc, &embedding_n, &region_max);
    size_t unit = 2 * (size_t)N, padded = (P + unit - 1) / unit * unit;
    printf("plan for %d rank(s): %zu parameters (%.2fB), micro batch %d, sequence length %d, %zu-byte working weights (%s)\n",
           N, P, psi / 1e9, tr->B, tr->T, weight_bytes, tr->ops->name);
    printf("memory per rank in GB:\n%-6s %9s %9s %9s %9s %11s %12s %12s %11s\n", "stage", "weights", "grads", "master+m+v", "buffers",
           "model state", "DeepSpeed", "activations", "total");
    for (int stage = 0; stage <= 2; stage++) {
        size_t n = stage == 0 ? padded : padded / N;
        size_t bucket = (size_t)c->reduce_bucket_size < padded ? (size_t)c->reduce_bucket_size : padded;
        ZeroMemory m = zero_memory_of(stage, N, padded, n, bucket, embedding_n, region_max, weight_bytes);
        double states = m.params + m.grads + m.master + m.moments, buffers = m.buckets + m.held_grads;
        double deepspeed = stage == 0 ? 16 * psi : stage == 1 ? 4 * psi + 12 * psi / N : 2 * psi + 14 * psi / N;
        printf("%-6d %9.2f %9.2f %9.2f %9.2f %11.2f %12.2f %12.2f %11.2f\n", stage, m.params / GB, m.grads / GB, (m.master + m.moments) / GB,
               buffers / GB, states / GB, deepspeed / GB, act / GB, (states + buffers + act) / GB);
    }
    printf("(buffers: ZeRO-2's gradient buckets (reduce_bucket_size %lld) and the gradient regions backward fills; activations: what this trainer allocates for the micro batch and sequence length)\n",
           (long long)c->reduce_bucket_size);
}

// What `./train_gpt` does: configure, train to --steps, validate, save, sample.
int train_main(int argc, char** argv, const ModelOps* ops) {
    Trainer tr;
    char err[1024];
    memset(&tr, 0, sizeof tr);
    tr.ops = ops;
    tr.last_saved = -1;
    parse_args(&tr.opt, argc, argv); // first: --comm-timeout bounds the ranks' rendezvous
    if (tr.opt.plan_ranks) { // a plan needs no ranks, data or memory: only the configurations
        load_effective_config(&tr.cfg, &tr.opt, tr.opt.plan_ranks);
        char folder[PATH_LEN];
        CheckpointState resumed;
        tr.mc = choose_model_config(&tr, folder, sizeof folder, &resumed);
        tr.B = (int)tr.cfg.micro_batch;
        tr.T = training_seq_len(&tr.opt, &tr.mc, tr.opt.resume ? &resumed : NULL);
        describe_model(&tr.mc, tr.T);
        print_plan(&tr, tr.opt.plan_ranks);
        return 0;
    }
    if (tr.opt.hf_out && tr.opt.steps == 0) return convert_to_hf(&tr.opt);
    if (tr.opt.hf_out && hf_out_check(tr.opt.hf_out, err, sizeof err)) fatal("%s", err); // now, not after training
    ops->init_comm(&tr.comm, &argc, &argv, tr.opt.comm_timeout);
    if (tr.comm.rank != 0 && freopen("/dev/null", "w", stdout) == NULL) fatal("cannot silence rank %d's output", tr.comm.rank); // rank 0 reports; errors still reach stderr
    tr.comm.timeout_s = tr.opt.comm_timeout;
    load_effective_config(&tr.cfg, &tr.opt, tr.comm.world_size);
    printf("dstrain %s, %d rank(s) (%s backend)\n", ops->name, tr.comm.world_size, tr.comm.backend);
    print_config(&tr.cfg, tr.comm.world_size);
    ops->describe_run(&tr.cfg, &tr.comm);

    char resume_folder[PATH_LEN] = {0};
    CheckpointState resume_state;
    memset(&resume_state, 0, sizeof resume_state);
    tr.mc = choose_model_config(&tr, resume_folder, sizeof resume_folder, &resume_state);
    tr.B = (int)tr.cfg.micro_batch;
    tr.T = training_seq_len(&tr.opt, &tr.mc, tr.opt.resume ? &resume_state : NULL);
    tr.ga = (int)tr.cfg.grad_accum;
    describe_model(&tr.mc, tr.T);
    tr.model = ops->build(&tr.mc, tr.B, tr.T, &tr.opt);
    tr.num_params = ops->num_params(tr.model);
    size_t embedding_n, region_max, weight_bytes;
    gradient_regions(&tr.mc, &embedding_n, &region_max);
    zero_init(&tr.zero, (int)tr.cfg.zero_stage, &tr.comm, ops->buf, tr.num_params, embedding_n, region_max, &tr.cfg);
    ops->weights(tr.model, &weight_bytes);
    zero_print_memory(&tr.zero, weight_bytes, weight_bytes == 4 ? "fp32" : "16-bit");
    ops->describe_memory(tr.model);
    fault_plan_parse(&tr.faults, getenv("DSTRAIN_INJECT_INF"), &tr.mc);
    for (int i = 0; i < tr.faults.count; i++) {
        printf("test fault injection (DSTRAIN_INJECT_INF): +inf in the gradient of %s at step %lld\n", tr.faults.names[i], (long long)tr.faults.steps[i]);
    }
    open_data(&tr);
    if (tr.opt.epochs) { // the tail of an epoch shorter than a global batch is dropped, as the loader does
        int64_t per_epoch = (int64_t)(tr.train.seqs_per_epoch / (size_t)tr.cfg.train_batch_size); // >= 1: the loader refuses less data
        tr.opt.steps = tr.opt.epochs * per_epoch;
        printf("epochs: %lld x %lld steps = %lld steps\n", (long long)tr.opt.epochs, (long long)per_epoch, (long long)tr.opt.steps);
    }

    train_state_init(&tr.state, &tr.cfg);
    rng_seed(&tr.rng, tr.opt.seed + 1);
    if (tr.opt.resume) load_checkpoint(&tr, resume_folder, &resume_state);
    else init_weights(&tr);
    Logger* lg = &tr.log;
    logger_open(lg, tr.comm.rank == 0 ? tr.opt.log_path : NULL, tr.opt.resume, tr.state.step, tr.cfg.steps_per_print);

    printf("training: steps %lld to %lld, %lld tokens per step\n", (long long)tr.state.step + 1, (long long)tr.opt.steps, (long long)(tr.cfg.train_batch_size * tr.T));
    rank_usage_start(&tr.usage, tr.state.step + 1);
    while (tr.state.step < tr.opt.steps) {
        double t0 = wall_seconds();
        StepPlan plan;
        float loss = train_step(&tr, &plan);
        log_train_step(&tr, &plan, loss, ms_since(t0));
        int last = tr.state.step == tr.opt.steps;
        if (tr.has_val && (last || (tr.opt.val_every && tr.state.step % tr.opt.val_every == 0))) {
            int batches;
            float val_loss = evaluate(&tr, &batches);
            log_val(lg, tr.state.step, val_loss, batches);
        }
        if (tr.opt.checkpoint_dir[0] && tr.opt.save_every && tr.state.step % tr.opt.save_every == 0) save_checkpoint(&tr);
    }
    if (tr.state.step > tr.log.first_step) report_ranks(&tr); // not when a resumed run had nothing left to train
    if (tr.opt.checkpoint_dir[0] && tr.last_saved != tr.state.step) save_checkpoint(&tr);
    if (tr.opt.hf_out) export_hf(&tr);
    if (tr.opt.sample_tokens > 0 && tr.comm.rank == 0) {
        Tokenizer tok;
        if (tokenizer_load(&tok, tr.opt.tokenizer_path, err, sizeof err)) {
            printf("no sample: %s\n", err);
        } else {
            sample_text(&tr, &tok);
            tokenizer_free(&tok);
        }
    }
    logger_close(lg);
    dataloader_free(&tr.train);
    if (tr.has_val) dataloader_free(&tr.val);
    zero_free(&tr.zero);
    ops->free(tr.model);
    tr.comm.finalize(&tr.comm);
    return 0;
}

#endif // DSTRAIN_H
