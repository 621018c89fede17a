/*
train_gpt.cu: the GPU trainer. GPT-2 and LLaMA (DeepSeek-LLM: Hugging Face's
LlamaForCausalLM) as explicit CUDA kernels (forward and backward), matrix products through
cuBLASLt, a flash-attention-style causal attention kernel with grouped-query attention, fused
AdamW, trained the way DeepSpeed trains them. Everything that is not model math (config, batch rules,
loss scaler, step logic, data loader, checkpoints, logs, command line, the training loop) is
in dstrain.h and shared with the CPU trainer, train_gpt.c, which is the reference for every
layer here: both compute the same function, layer by layer.

Sections, in order; train_gpt.c has the same ones in the same order, with the same names,
and its own CPU-only ones between them:
    checked CUDA and cuBLAS calls  (GPU only)
    precision                      (GPU only) floatX
    device, stream, cuBLASLt       (GPU only)
    reductions                     (GPU only) warp and block sums
    encoder                        token and position embeddings
    layernorm
    column sums                    (GPU only) bias and norm weight gradients
    rmsnorm                        LLaMA's norm
    matmul                         cuBLASLt
    attention                      causal self-attention, flash-attention style, grouped-query
    rope                           rotary position embeddings
    gelu                           tanh approximation
    swiglu                         LLaMA's MLP activation
    classifier                     softmax and cross-entropy
    the model                      GPT-2 and LLaMA in one layer loop: weights, activations, forward, backward
    optimizer buffers              the arithmetic of dstrain.h's ZeRO, on the device
    device statistics              (GPU only) MFU, memory, utilisation (NVML, loaded at run time)
    several GPUs                   (GPU only) NCCL, host staging through MPI, gpu_init_comm
    the trainer                    the model behind dstrain.h's ModelOps, and main

    make train_gpt_cu PRECISION=BF16 && ./train_gpt_cu --help      (PRECISION: FP32, FP16, BF16)

Precision, chosen at build time (-DENABLE_FP32 / -DENABLE_FP16 / -DENABLE_BF16, default BF16):
  - floatX, the type of the weights the kernels read and of every activation, is fp32, fp16
    or bf16. Matrix products accumulate in fp32 in every build (cuBLASLt compute type 32F;
    the FP32 build is true fp32, no TF32), and so do the kernels' own reductions.
  - The fp32 master weights and Adam moments belong to dstrain.h's ZeRO engine, in device
    buffers it handles through DEVICE_BUFFERS (kernels below: fused AdamW, the global norm
    and inf/nan check, ...); after each update the driver hands the master to set_weights,
    which writes the floatX working weights the kernels read (a copy in the FP32 build).
  - Weight gradients are fp32 in every build: the weight-gradient matrix products write
    fp32 directly (floatX inputs, fp32 output, beta = 1 to accumulate), so gradients are
    accumulated over micro batches in fp32, and grad_stats and AdamW read what they need
    without a conversion. Activation gradients are floatX.
  - FP16 needs DeepSpeed's loss scaling (dstrain.h): backward receives loss scale / ga as
    dloss_scale, so every fp16 activation gradient carries the scale. An fp16 overflow in
    the backward pass shows up as inf/nan in the fp32 weight gradients, and a scaled weight
    gradient of 65520 or more would have been inf in DeepSpeed's fp16 gradients: grad_stats
    counts both as an overflow (GRAD_OVERFLOW_AT), so the step is skipped as there.

Layer structure (shapes in each kernel's comment). Per layer, with residual stream x:
    GPT-2: ln1 = LN(x); qkv = ln1 W_qkv^T + b; y = attention(qkv); x2 = x + y W_proj^T + b
           ln2 = LN(x2); h = ln2 W_fc^T + b; g = GELU(h); x3 = x2 + g W_fcproj^T + b
    LLaMA: ln1 = RMSNorm(x); qkv = rope(ln1 W_qkv^T); y = attention(qkv); x2 = x + y W_proj^T
           ln2 = RMSNorm(x2); [gate | up] = ln2 W_fc^T; g = silu(gate) up; x3 = x2 + g W_fcproj^T
The residual additions happen inside the projection matrix products (cuBLASLt's C input
with beta = 1 and the bias epilogue): D = A B + bias + residual in one pass, rounded once.
GELU is our own kernel (tanh approximation, as PyTorch's approximate="tanh"): cuBLASLt's
GELU epilogue does not document which GELU it evaluates nor how accurately, and the FP32
build must agree with PyTorch to 1e-5; --recompute needs the kernel anyway.

Determinism: no floating-point atomics anywhere. Every reduction (norm and bias gradients,
the embedding gradient, the attention gradients, shared key/value heads included, the global
norm) has a fixed order, so two identical runs are bit-identical.
*/
#include "dstrain.h"
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <mma.h>
#include <type_traits>
#ifdef USE_NCCL
#include <nccl.h>
#endif

// ----------------------------------------------------------------------------
// checked CUDA and cuBLAS calls

static void cuda_check(cudaError_t e, const char* file, int line) {
    if (e != cudaSuccess) fatal("CUDA error at %s:%d: %s (%s)", file, line, cudaGetErrorString(e), cudaGetErrorName(e));
}
#define cudaCheck(call) cuda_check((call), __FILE__, __LINE__)

static void cublas_check(cublasStatus_t s, const char* file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) fatal("cuBLAS error at %s:%d: %s (%s)", file, line, cublasLtGetStatusString(s), cublasLtGetStatusName(s));
}
#define cublasCheck(call) cublas_check((call), __FILE__, __LINE__)

// after every kernel launch: a bad launch configuration is reported where it happened
#define launchCheck() cuda_check(cudaGetLastError(), __FILE__, __LINE__)

// ----------------------------------------------------------------------------
// precision

#if defined(ENABLE_FP32)
typedef float floatX;
#define PRECISION_NAME "fp32"
#define PRECISION_FLAG "FP32"
#define CUDA_FLOATX CUDA_R_32F
__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline floatX to_floatX(float x) { return x; }
#elif defined(ENABLE_FP16)
typedef __half floatX;
#define PRECISION_NAME "fp16"
#define PRECISION_FLAG "FP16"
#define CUDA_FLOATX CUDA_R_16F
__host__ __device__ inline float to_float(__half x) { return __half2float(x); }
__host__ __device__ inline floatX to_floatX(float x) { return __float2half_rn(x); }
#else
#ifndef ENABLE_BF16
#define ENABLE_BF16
#endif
typedef __nv_bfloat16 floatX;
#define PRECISION_NAME "bf16"
#define PRECISION_FLAG "BF16"
#define CUDA_FLOATX CUDA_R_16BF
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ inline floatX to_floatX(float x) { return __float2bfloat16_rn(x); }
#endif

// 16 bytes of floatX: the unit of vectorised loads and stores. Every row length the kernels
// see (C, 3C, 4C, Vp) is a multiple of 16 elements and every buffer is 16-byte aligned.
static constexpr int X_PER_PACK = 16 / sizeof(floatX);
struct alignas(16) PackX { floatX v[X_PER_PACK]; };

// ----------------------------------------------------------------------------
// device, stream, cuBLASLt: one device and one stream per process

static cudaStream_t stream; // the one stream of compute; NCCL's collectives are ordered after it (several GPUs)
static cudaDeviceProp device_prop;
static cublasLtHandle_t cublaslt;
static void* cublaslt_workspace;
static const size_t CUBLASLT_WORKSPACE_BYTES = 32u << 20; // what cuBLAS recommends for Hopper

// How long the host waits for the device before it gives up: the device may wait for a
// collective that another rank never joins. gpu_init_comm sets it (--comm-timeout), and
// NCCL its checks: an asynchronous error ends the run at once, a timeout aborts the
// communicator first, so that the other ranks stop too.
static double device_timeout_s = 300.0;
static void (*device_wait_check)(const char* what) = NULL;
static void (*device_wait_abort)(void) = NULL;

// The host waits until `done` has happened, polling, bounded by device_timeout_s.
static void event_wait(cudaEvent_t done, const char* what) {
    double start = wall_seconds();
    cudaError_t q;
    for (long polls = 0; (q = cudaEventQuery(done)) == cudaErrorNotReady; polls++) {
        if (polls < 1000) continue; // spin first: most waits are short
        if (device_wait_check) device_wait_check(what);
        if (wall_seconds() - start > device_timeout_s) {
            fprintf(stderr, "error: %s did not complete within %.0f s (--comm-timeout): a collective it waits for is stuck "
                    "(another rank died, hangs, or took a different path); ending the run\n", what, device_timeout_s);
            if (device_wait_abort) device_wait_abort();
            exit(3);
        }
        usleep(50);
    }
    cudaCheck(q);
}

// The host waits for everything queued on the stream so far (bounded: event_wait).
static void stream_wait(const char* what) {
    static cudaEvent_t done = NULL;
    if (done == NULL) cudaCheck(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    cudaCheck(cudaEventRecord(done, stream));
    event_wait(done, what);
}

static void cuda_setup(void) {
    static int ready = 0;
    if (ready) return;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) fatal("no CUDA device (%s): the GPU trainer needs an NVIDIA GPU; build the CPU trainer with `make train_gpt_cpu`", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    int device = 0; // chosen by gpu_init_comm (several GPUs): one GPU per local rank
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaGetDeviceProperties(&device_prop, device));
    cudaCheck(cudaStreamCreate(&stream));
    cublasCheck(cublasLtCreate(&cublaslt));
    cudaCheck(cudaMalloc(&cublaslt_workspace, CUBLASLT_WORKSPACE_BYTES));
    ready = 1;
}

__host__ __device__ inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }
static inline size_t round_up(size_t a, size_t b) { return ceil_div(a, b) * b; }

// ----------------------------------------------------------------------------
// reductions: warp butterflies and a block sum in a fixed order (deterministic)

template <typename T> __device__ inline T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the same total.
template <typename T> __device__ T block_sum(T v) {
    __shared__ T partial[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    v = warp_sum(v);
    __syncthreads(); // a previous call may still be reading partial
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    T total = 0;
    for (int i = 0; i < (int)blockDim.x / 32; i++) total += partial[i];
    return total;
}

__device__ float block_max(float v) {
    __shared__ float partial[32];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int i = 0; i < (int)blockDim.x / 32; i++) m = fmaxf(m, partial[i]);
    return m;
}

// ----------------------------------------------------------------------------
// encoder: token and position embeddings

// out (B,T,C) = wte[inp] + wpe[t]; wpe NULL (LLaMA: positions are rotary, in attention):
// wte[inp]. One thread per pack of X_PER_PACK channels.
__global__ void encoder_forward_kernel(floatX* out, const int* inp, const floatX* wte, const floatX* wpe, int BT, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int packs = C / X_PER_PACK;
    if (i >= (size_t)BT * packs) return;
    size_t bt = i / packs;
    int c = (int)(i % packs) * X_PER_PACK, t = (int)(bt % T);
    PackX o = *(const PackX*)(wte + (size_t)inp[bt] * C + c);
    if (wpe) {
        PackX pe = *(const PackX*)(wpe + (size_t)t * C + c);
        for (int k = 0; k < X_PER_PACK; k++) o.v[k] = to_floatX(to_float(o.v[k]) + to_float(pe.v[k]));
    }
    *(PackX*)(out + bt * C + c) = o;
}

static void encoder_forward(floatX* out, const int* inp, const floatX* wte, const floatX* wpe, int B, int T, int C) {
    size_t n = (size_t)B * T * (C / X_PER_PACK);
    encoder_forward_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(out, inp, wte, wpe, B * T, T, C);
    launchCheck();
}

// dwpe (maxT,C) += sum over b of dout (B,T,C); one thread per (t, c), b in order
__global__ void encoder_backward_wpe_kernel(float* dwpe, const floatX* dout, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * C) return;
    float s = 0.0f;
    for (int b = 0; b < B; b++) s += to_float(dout[(size_t)b * T * C + i]);
    dwpe[i] += s;
}

// dwte (Vp,C) += dout (B,T,C) scattered by token, without atomics: buckets (nb,3) hold, for
// each distinct token, (token, first index into positions, count); positions lists the
// (b*T + t) of that token in increasing order. grid (nb, ceil(C/256)): one thread per
// (token, channel) sums its rows in order.
__global__ void encoder_backward_wte_kernel(float* dwte, const floatX* dout, const int* buckets, const int* positions, int C) {
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int* bucket = buckets + 3 * (size_t)blockIdx.x;
    float s = 0.0f;
    for (int j = 0; j < bucket[2]; j++) s += to_float(dout[(size_t)positions[bucket[1] + j] * C + c]);
    dwte[(size_t)bucket[0] * C + c] += s;
}

// The host side of the scatter: a counting sort of the batch's positions by token.
typedef struct {
    int* count;         // host (V): scratch of the counting sort
    int* host;          // pinned: buckets (3 per distinct token), then positions (B*T)
    int* device;        // the same on the device
    cudaEvent_t copied; // set when the last upload finished, so `host` may be rewritten
} TokenBuckets;

// capacity: the model's B*T
static void token_buckets_init(TokenBuckets* tb, int vocab_size, int capacity) {
    tb->count = (int*)callocCheck(vocab_size, sizeof(int));
    cudaCheck(cudaMallocHost(&tb->host, 4 * (size_t)capacity * sizeof(int)));
    cudaCheck(cudaMalloc(&tb->device, 4 * (size_t)capacity * sizeof(int)));
    cudaCheck(cudaEventCreateWithFlags(&tb->copied, cudaEventDisableTiming));
    cudaCheck(cudaEventRecord(tb->copied, stream));
}

static void token_buckets_free(TokenBuckets* tb) {
    free(tb->count);
    cudaCheck(cudaFreeHost(tb->host));
    cudaCheck(cudaFree(tb->device));
    cudaCheck(cudaEventDestroy(tb->copied));
}

// inp (host, B*T tokens, each < V): builds and uploads the buckets; returns how many there are
static int token_buckets_upload(TokenBuckets* tb, const int* inp, int BT, int V) {
    cudaCheck(cudaEventSynchronize(tb->copied)); // long finished in practice: a forward synced since
    int* count = tb->count;
    for (int i = 0; i < BT; i++) count[inp[i]]++;
    int nb = 0, start = 0;
    for (int tok = 0; tok < V; tok++) {
        if (count[tok] == 0) continue;
        int* bucket = tb->host + 3 * nb++;
        bucket[0] = tok;
        bucket[1] = start;
        bucket[2] = count[tok];
        start += count[tok];
        count[tok] = bucket[1]; // from here on: where the token's next position goes
    }
    int* positions = tb->host + 3 * nb;
    for (int i = 0; i < BT; i++) positions[count[inp[i]]++] = i; // increasing within each bucket
    for (int i = 0; i < BT; i++) count[inp[i]] = 0;             // ready for the next batch
    cudaCheck(cudaMemcpyAsync(tb->device, tb->host, (3 * (size_t)nb + BT) * sizeof(int), cudaMemcpyHostToDevice, stream));
    cudaCheck(cudaEventRecord(tb->copied, stream));
    return nb;
}

// tb: the buckets of this batch's tokens (token_buckets_upload, nb of them, done by forward
// so that backward does no host work); dwpe NULL: no position embedding (LLaMA)
static void encoder_backward(float* dwte, float* dwpe, const floatX* dout, int B, int T, int C, const TokenBuckets* tb, int nb) {
    encoder_backward_wte_kernel<<<dim3(nb, ceil_div(C, 256)), 256, 0, stream>>>(dwte, dout, tb->device, tb->device + 3 * nb, C);
    launchCheck();
    if (!dwpe) return;
    encoder_backward_wpe_kernel<<<ceil_div((size_t)T * C, 256), 256, 0, stream>>>(dwpe, dout, B, T, C);
    launchCheck();
}

// ----------------------------------------------------------------------------
// layernorm

// out (N,C) = (inp - mean) * rstd * weight + bias per row; saves mean, rstd (N).
// One warp per row; --recompute calls it again in backward and gets the same bits.
__global__ void layernorm_forward_kernel(floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* weight, const floatX* bias, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const floatX* x = inp + (size_t)row * C;
    int packs = C / X_PER_PACK;
    float sum = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        PackX v = *(const PackX*)(x + p * X_PER_PACK);
        for (int k = 0; k < X_PER_PACK; k++) sum += to_float(v.v[k]);
    }
    float m = warp_sum(sum) / C;
    float var = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        PackX v = *(const PackX*)(x + p * X_PER_PACK);
        for (int k = 0; k < X_PER_PACK; k++) { float d = to_float(v.v[k]) - m; var += d * d; }
    }
    float s = 1.0f / sqrtf(warp_sum(var) / C + eps);
    for (int p = lane; p < packs; p += 32) {
        int c = p * X_PER_PACK;
        PackX v = *(const PackX*)(x + c), w = *(const PackX*)(weight + c), b = *(const PackX*)(bias + c), o;
        for (int k = 0; k < X_PER_PACK; k++) o.v[k] = to_floatX((to_float(v.v[k]) - m) * s * to_float(w.v[k]) + to_float(b.v[k]));
        *(PackX*)(out + (size_t)row * C + c) = o;
    }
    if (lane == 0) { mean[row] = m; rstd[row] = s; }
}

static void layernorm_forward(floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* weight, const floatX* bias, int N, int C, float eps) {
    layernorm_forward_kernel<<<ceil_div(N, 8), 256, 0, stream>>>(out, mean, rstd, inp, weight, bias, N, C, eps);
    launchCheck();
}

// dinp (N,C) += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * weight,
// norm = (inp - mean) * rstd. One warp per row.
__global__ void layernorm_backward_kernel(floatX* dinp, const floatX* dout, const floatX* inp, const floatX* weight, const float* mean, const float* rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    size_t off = (size_t)row * C;
    float m = mean[row], s = rstd[row];
    int packs = C / X_PER_PACK;
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        int c = p * X_PER_PACK;
        PackX d = *(const PackX*)(dout + off + c), x = *(const PackX*)(inp + off + c), w = *(const PackX*)(weight + c);
        for (int k = 0; k < X_PER_PACK; k++) {
            float dnorm = to_float(d.v[k]) * to_float(w.v[k]);
            dnorm_sum += dnorm;
            dnorm_norm_sum += dnorm * (to_float(x.v[k]) - m) * s;
        }
    }
    float a = warp_sum(dnorm_sum) / C, b = warp_sum(dnorm_norm_sum) / C;
    for (int p = lane; p < packs; p += 32) {
        int c = p * X_PER_PACK;
        PackX d = *(const PackX*)(dout + off + c), x = *(const PackX*)(inp + off + c), w = *(const PackX*)(weight + c);
        PackX o = *(const PackX*)(dinp + off + c);
        for (int k = 0; k < X_PER_PACK; k++) {
            float norm = (to_float(x.v[k]) - m) * s;
            o.v[k] = to_floatX(to_float(o.v[k]) + s * (to_float(d.v[k]) * to_float(w.v[k]) - a - norm * b));
        }
        *(PackX*)(dinp + off + c) = o;
    }
}

// ----------------------------------------------------------------------------
// column sums: bias gradients and norm weight gradients, deterministic.
// Rows are cut into chunks of COLSUM_ROWS; a first kernel writes each chunk's sums, a second
// adds the chunks in order. partial (chunks, 2, C): slot 0 = sum of dout * norm (norms only:
// norm = (inp - mean) * rstd for LayerNorm, inp * rstd for RMSNorm, whose mean is NULL),
// slot 1 = sum of dout.

#define COLSUM_ROWS 128

// grid (ceil(C/32), chunks), block (32, 8): thread (x, y) sums rows y, y+8, ... of its chunk
__global__ void column_sums_kernel(float* partial, const floatX* dout, const floatX* inp, const float* mean, const float* rstd, int N, int C) {
    __shared__ float sums[2][8][32];
    int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    int end = min(N, (chunk + 1) * COLSUM_ROWS);
    float s_norm = 0.0f, s = 0.0f;
    if (c < C) {
        for (int n = chunk * COLSUM_ROWS + threadIdx.y; n < end; n += 8) {
            float d = to_float(dout[(size_t)n * C + c]);
            s += d;
            if (inp) s_norm += d * (to_float(inp[(size_t)n * C + c]) - (mean ? mean[n] : 0.0f)) * rstd[n];
        }
    }
    sums[0][threadIdx.y][threadIdx.x] = s_norm;
    sums[1][threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y < 2 && c < C) {
        float total = 0.0f;
        for (int y = 0; y < 8; y++) total += sums[threadIdx.y][y][threadIdx.x];
        partial[((size_t)chunk * 2 + threadIdx.y) * C + c] = total;
    }
}

// dst_norm (C) += sum of slot 0 over chunks, dst (C) += sum of slot 1 (each if not NULL)
__global__ void column_sums_finalize_kernel(float* dst_norm, float* dst, const float* partial, int chunks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s_norm = 0.0f, s = 0.0f;
    for (int k = 0; k < chunks; k++) {
        s_norm += partial[((size_t)k * 2) * C + c];
        s += partial[((size_t)k * 2 + 1) * C + c];
    }
    if (dst_norm) dst_norm[c] += s_norm;
    if (dst) dst[c] += s;
}

static size_t column_sums_scratch_floats(int N, int C) { return ceil_div(N, COLSUM_ROWS) * 2 * (size_t)C; }

static void column_sums(float* dst_norm, float* dst, const floatX* dout, const floatX* inp, const float* mean, const float* rstd, int N, int C, float* scratch) {
    int chunks = (int)ceil_div(N, COLSUM_ROWS);
    column_sums_kernel<<<dim3(ceil_div(C, 32), chunks), dim3(32, 8), 0, stream>>>(scratch, dout, inp, mean, rstd, N, C);
    launchCheck();
    column_sums_finalize_kernel<<<ceil_div(C, 256), 256, 0, stream>>>(dst_norm, dst, scratch, chunks, C);
    launchCheck();
}

// dinp (N,C) += LayerNorm backward; dweight (C) += sum dout * norm; dbias (C) += sum dout
static void layernorm_backward(floatX* dinp, float* dweight, float* dbias, const floatX* dout, const floatX* inp, const floatX* weight,
                               const float* mean, const float* rstd, int N, int C, float* scratch) {
    layernorm_backward_kernel<<<ceil_div(N, 8), 256, 0, stream>>>(dinp, dout, inp, weight, mean, rstd, N, C);
    launchCheck();
    column_sums(dweight, dbias, dout, inp, mean, rstd, N, C, scratch);
}

// ----------------------------------------------------------------------------
// rmsnorm (LLaMA)

// out (N,C) = inp * rstd * weight, rstd = 1 / sqrt(mean(inp^2) + eps) per row, as
// transformers' LlamaRMSNorm; saves rstd (N). One warp per row, as layernorm_forward_kernel.
__global__ void rmsnorm_forward_kernel(floatX* out, float* rstd, const floatX* inp, const floatX* weight, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const floatX* x = inp + (size_t)row * C;
    int packs = C / X_PER_PACK;
    float sumsq = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        PackX v = *(const PackX*)(x + p * X_PER_PACK);
        for (int k = 0; k < X_PER_PACK; k++) sumsq += to_float(v.v[k]) * to_float(v.v[k]);
    }
    float s = 1.0f / sqrtf(warp_sum(sumsq) / C + eps);
    for (int p = lane; p < packs; p += 32) {
        int c = p * X_PER_PACK;
        PackX v = *(const PackX*)(x + c), w = *(const PackX*)(weight + c), o;
        for (int k = 0; k < X_PER_PACK; k++) o.v[k] = to_floatX(to_float(w.v[k]) * (to_float(v.v[k]) * s));
        *(PackX*)(out + (size_t)row * C + c) = o;
    }
    if (lane == 0) rstd[row] = s;
}

static void rmsnorm_forward(floatX* out, float* rstd, const floatX* inp, const floatX* weight, int N, int C, float eps) {
    rmsnorm_forward_kernel<<<ceil_div(N, 8), 256, 0, stream>>>(out, rstd, inp, weight, N, C, eps);
    launchCheck();
}

// dinp (N,C) += rstd * (dnorm - norm * mean(dnorm * norm)), dnorm = dout * weight, norm = inp * rstd.
// One warp per row.
__global__ void rmsnorm_backward_kernel(floatX* dinp, const floatX* dout, const floatX* inp, const floatX* weight, const float* rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    size_t off = (size_t)row * C;
    float s = rstd[row];
    int packs = C / X_PER_PACK;
    float dnorm_norm_sum = 0.0f;
    for (int p = lane; p < packs; p += 32) {
        int c = p * X_PER_PACK;
        PackX d = *(const PackX*)(dout + off + c), x = *(const PackX*)(inp + off + c), w = *(const PackX*)(weight + c);
        for (int k = 0; k < X_PER_PACK; k++) dnorm_norm_sum += to_float(d.v[k]) * to_float(w.v[k]) * (to_float(x.v[k]) * s);
    }
    float b = warp_sum(dnorm_norm_sum) / C;
    for (int p = lane; p < packs; p += 32) {
        int c = p * X_PER_PACK;
        PackX d = *(const PackX*)(dout + off + c), x = *(const PackX*)(inp + off + c), w = *(const PackX*)(weight + c);
        PackX o = *(const PackX*)(dinp + off + c);
        for (int k = 0; k < X_PER_PACK; k++) {
            o.v[k] = to_floatX(to_float(o.v[k]) + s * (to_float(d.v[k]) * to_float(w.v[k]) - to_float(x.v[k]) * s * b));
        }
        *(PackX*)(dinp + off + c) = o;
    }
}

// dinp (N,C) += RMSNorm backward; dweight (C) += sum dout * inp * rstd
static void rmsnorm_backward(floatX* dinp, float* dweight, const floatX* dout, const floatX* inp, const floatX* weight, const float* rstd,
                             int N, int C, float* scratch) {
    rmsnorm_backward_kernel<<<ceil_div(N, 8), 256, 0, stream>>>(dinp, dout, inp, weight, rstd, N, C);
    launchCheck();
    column_sums(dweight, NULL, dout, inp, NULL, rstd, N, C, scratch);
}

// ----------------------------------------------------------------------------
// matmul: cuBLASLt, fp32 accumulation in every precision. Row-major tensors, weights (OC,C)
// as in PyTorch. cuBLASLt is column-major: a row-major (r,c) matrix is a column-major (c,r)
// one, so out = inp @ W^T is computed as out^T = W inp^T (see each wrapper).
//
// A plan (descriptors and the heuristic's algorithm) is made once per shape, transposes,
// epilogue and pointer alignment, and reused: the same call gets the same algorithm, so
// results are reproducible, and no heuristic query runs inside a step after the first.

typedef struct {
    int m, n, k, lda, ldb, trans_a, trans_b, bias, d_type;
    uint32_t align[5]; // A, B, C, D, bias (bytes, at most 256)
} MatmulKey;

typedef struct {
    MatmulKey key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, cd; // C and D share their layout
    cublasLtMatmulAlgo_t algo;
} MatmulPlan;

#define MAX_MATMUL_PLANS 64
static MatmulPlan matmul_plans[MAX_MATMUL_PLANS];
static int num_matmul_plans;

static uint32_t alignment_of(const void* p) {
    uint32_t a = 256;
    while (a > 1 && (uintptr_t)p % a) a /= 2;
    return a;
}

static void set_attribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const void* value, size_t size) {
    cublasCheck(cublasLtMatmulDescSetAttribute(d, attr, value, size));
}

static void matmul_plans_free(void) {
    for (int i = 0; i < num_matmul_plans; i++) {
        cublasCheck(cublasLtMatmulDescDestroy(matmul_plans[i].desc));
        cublasCheck(cublasLtMatrixLayoutDestroy(matmul_plans[i].a));
        cublasCheck(cublasLtMatrixLayoutDestroy(matmul_plans[i].b));
        cublasCheck(cublasLtMatrixLayoutDestroy(matmul_plans[i].cd));
    }
    num_matmul_plans = 0;
}

static MatmulPlan* matmul_plan(const MatmulKey* key, const void* bias) {
    for (int i = 0; i < num_matmul_plans; i++) {
        if (memcmp(&matmul_plans[i].key, key, sizeof(*key)) == 0) return &matmul_plans[i];
    }
    if (num_matmul_plans == MAX_MATMUL_PLANS) matmul_plans_free(); // sampling meets a new T per token: start over
    MatmulPlan* p = &matmul_plans[num_matmul_plans++];
    p->key = *key;
    cublasCheck(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    int32_t ta = key->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = key->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    set_attribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    set_attribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    uint32_t epilogue = key->bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    set_attribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue);
    if (key->bias) {
        int32_t bias_type = CUDA_FLOATX;
        set_attribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type);
        set_attribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias); // the heuristic reads its alignment
    }
    // stored (pre-transpose) shapes, column-major
    cublasCheck(cublasLtMatrixLayoutCreate(&p->a, CUDA_FLOATX, key->trans_a ? key->k : key->m, key->trans_a ? key->m : key->k, key->lda));
    cublasCheck(cublasLtMatrixLayoutCreate(&p->b, CUDA_FLOATX, key->trans_b ? key->n : key->k, key->trans_b ? key->k : key->n, key->ldb));
    cublasCheck(cublasLtMatrixLayoutCreate(&p->cd, (cudaDataType_t)key->d_type, key->m, key->n, key->m));
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = CUBLASLT_WORKSPACE_BYTES;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    const cublasLtMatmulPreferenceAttributes_t align_attrs[4] = {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                                  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, align_attrs[i], &key->align[i], sizeof(uint32_t)));
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(cublaslt, p->desc, p->a, p->b, p->cd, p->cd, pref, 1, &result, &found));
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    if (found == 0) fatal("cuBLASLt has no algorithm for a %d x %d x %d product (transposes %d %d, bias %d)", key->m, key->n, key->k, key->trans_a, key->trans_b, key->bias);
    p->algo = result.algo;
    return p;
}

// D (m x n, column-major, ld m) = alpha op(A) op(B) + beta C (+ bias (m) broadcast over
// columns). A, B floatX; C, D of d_type (floatX, or fp32 for weight gradients); C == D
// when c is NULL.
static void matmul_cublaslt(void* d, cudaDataType_t d_type, const void* c, float beta, const floatX* a, int lda, int trans_a,
                            const floatX* b, int ldb, int trans_b, int m, int n, int k, float alpha, const floatX* bias) {
    MatmulKey key;
    memset(&key, 0, sizeof key); // padding bytes take part in the comparison
    key.m = m; key.n = n; key.k = k; key.lda = lda; key.ldb = ldb;
    key.trans_a = trans_a; key.trans_b = trans_b; key.bias = bias != NULL; key.d_type = d_type;
    const void* ptrs[5] = {a, b, c ? c : d, d, bias};
    for (int i = 0; i < 5; i++) key.align[i] = alignment_of(ptrs[i]);
    MatmulPlan* p = matmul_plan(&key, bias);
    if (bias) set_attribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
    cublasCheck(cublasLtMatmul(cublaslt, p->desc, &alpha, a, p->a, b, p->b, &beta, c ? c : d, p->cd, d, p->cd, &p->algo,
                               cublaslt_workspace, CUBLASLT_WORKSPACE_BYTES, stream));
}

// out (N,OC) = inp (N,C) @ weight^T (weight (OC,C)) + bias (OC, may be NULL) + residual (N,OC, may be NULL)
// column-major: out^T (OC x N) = weight (stored C x OC, transposed) inp^T (C x N)
static void matmul_forward(floatX* out, const floatX* inp, const floatX* weight, const floatX* bias, const floatX* residual, int N, int C, int OC) {
    matmul_cublaslt(out, CUDA_FLOATX, residual, residual ? 1.0f : 0.0f, weight, C, 1, inp, C, 0, OC, N, C, 1.0f, bias);
}

// dinp (N,C) = dout (N,OC) @ weight (OC,C); column-major: dinp^T (C x N) = weight (C x OC) dout^T (OC x N)
static void matmul_backward_input(floatX* dinp, const floatX* dout, const floatX* weight, int N, int C, int OC) {
    matmul_cublaslt(dinp, CUDA_FLOATX, NULL, 0.0f, weight, C, 0, dout, OC, 0, C, N, OC, 1.0f, NULL);
}

// dweight (OC,C), fp32, += dout^T (OC,N) @ inp (N,C); column-major: dweight^T (C x OC) += inp^T (C x N) dout (N x OC)
static void matmul_backward_weight(float* dweight, const floatX* dout, const floatX* inp, int N, int C, int OC) {
    matmul_cublaslt(dweight, CUDA_R_32F, NULL, 1.0f, inp, C, 0, dout, OC, 1, C, OC, N, 1.0f, NULL);
}

// dbias (OC) += sum over rows of dout (N,OC) (section "column sums")
static void bias_backward(float* dbias, const floatX* dout, int N, int OC, float* scratch) {
    column_sums(NULL, dbias, dout, NULL, NULL, NULL, N, OC, scratch);
}

// ----------------------------------------------------------------------------
// attention: causal self-attention, flash-attention style. The (T,T) score matrix is never
// stored: forward keeps, per query, the log-sum-exp of its scores (lse), and backward
// recomputes the probabilities tile by tile from it.
//
// Tiles of 64 queries x 64 keys; a block of 4 warps owns a 64-row tile of one (batch, head)
// and each warp 16 of its rows. All products are warp-level 16-row tile products on shared
// memory (warp_mma): tensor cores (WMMA, floatX inputs, fp32 accumulation) in the 16-bit
// builds, fp32 on the CUDA cores in the FP32 build. The softmax and its gradient are
// elementwise passes between products: lanes 2r and 2r+1 own row r of a warp's 16 x 64 tile,
// 32 columns each, so a row's reduction is one shuffle.
//   forward:  per query tile, loop over key tiles up to the diagonal with the online softmax
//             (running max m and sum l per row, the output rescaled when m grows).
//   backward: a prep kernel computes D = rowsum(dO * O); then two kernels without atomics
//             (deterministic): one per key tile accumulates dK and dV over the query tiles
//             at or below the diagonal, one per query tile accumulates dQ over the key
//             tiles up to it. Both recompute P = exp2(S * scale * log2(e) - lse), so the
//             backward does 7 tile products where one kernel with atomic dQ would do 5:
//             the price of bit-identical runs.
// P and dS are rounded to floatX before their products (as FlashAttention does). The
// accumulators (O, dK, dV, dQ) live in shared memory, not in fragments, so that one code
// path serves the tensor cores and the fp32 build; keeping them in registers is the first
// thing to try for speed.
// Grouped-query attention (LLaMA): a query head reads its group's key/value head where qkv
// holds it, without copies; the dK/dV kernel runs one block per key/value head and adds its
// group's query heads in order, so that the shared gradients need no atomics either.
// Requirements (checked at build): head size hs a multiple of 16, at most 128.

#define ATT_TILE 64
#define ATT_WARPS 4
#define ATT_THREADS (32 * ATT_WARPS)
#define ATT_LDS (ATT_TILE + 4) // row stride of the fp32 score tiles
#if defined(ENABLE_FP32)
#define ATT_LDP ATT_LDS        // FP32: P and dS overwrite S in place (att_smem_layout)
#else
#define ATT_LDP (ATT_TILE + 8) // row stride of the floatX probability tiles
#endif
__host__ __device__ inline int att_ldx(int hs) { return hs + 8; } // floatX (64 x hs) tiles: keeps WMMA's 32-byte alignment
__host__ __device__ inline int att_lda(int hs) { return hs + 4; } // fp32 (16 x hs) accumulators
__host__ __device__ inline int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// Byte offsets into the attention kernels' dynamic shared memory.
struct AttSmem {
    int tile[4];      // 64 x hs floatX tiles shared by the block (Q, K, V, dO)
    int rowvec[2];    // 64 floats each: a query tile's lse and D
    int score, prob;  // per warp: a 16 x 64 fp32 tile (S, then dP), a 16 x 64 floatX tile (P, then dS)
    int acc[2];       // per warp: 16 x hs fp32 accumulators (O; dK and dV; dQ)
    int score_stride, prob_stride, acc_stride; // bytes from one warp's tile to the next
    int bytes;
};

__host__ __device__ inline AttSmem att_smem_layout(int hs, int n_tiles, int n_acc) {
    AttSmem L;
    int off = 0;
    for (int i = 0; i < 4; i++) { L.tile[i] = off; if (i < n_tiles) off += align128(ATT_TILE * att_ldx(hs) * (int)sizeof(floatX)); }
    for (int i = 0; i < 2; i++) { L.rowvec[i] = off; off += align128(ATT_TILE * (int)sizeof(float)); }
    L.score_stride = align128(16 * ATT_LDS * (int)sizeof(float));
    L.prob_stride = align128(16 * ATT_LDP * (int)sizeof(floatX));
    L.acc_stride = align128(16 * att_lda(hs) * (int)sizeof(float));
    L.score = off; off += ATT_WARPS * L.score_stride;
#if defined(ENABLE_FP32)
    // fp32 P and dS have S's shape and stride, and each lane overwrites only the S values it
    // has read: they share S's tile, which makes room for head size 128 in an H100's 227 KB
    L.prob = L.score;
    L.prob_stride = L.score_stride;
#else
    L.prob = off; off += ATT_WARPS * L.prob_stride;
#endif
    for (int i = 0; i < 2; i++) { L.acc[i] = off; if (i < n_acc) off += ATT_WARPS * L.acc_stride; }
    L.bytes = off;
    return L;
}

// the three kernels' layouts: forward (Q, K, V; O), dK/dV (K, V, Q, dO; dK, dV), dQ (Q, dO, K, V; dQ)
#define ATT_FWD_LAYOUT(hs) att_smem_layout(hs, 3, 1)
#define ATT_DKDV_LAYOUT(hs) att_smem_layout(hs, 4, 2)
#define ATT_DQ_LAYOUT(hs) att_smem_layout(hs, 4, 1)

// The heads' columns in qkv (B,T,QKV): per position the NH query heads, then the NKV key
// heads, then the NKV value heads, QKV = (NH + 2 NKV) hs (GPT-2: NKV = NH, 3C). Query head h
// reads key/value head h / group, group = NH / NKV.
struct AttHeads {
    int NH, NKV, hs;
    __host__ __device__ size_t row() const { return (size_t)(NH + 2 * NKV) * hs; }
    __host__ __device__ int group() const { return NH / NKV; }
    __host__ __device__ size_t q(int h) const { return (size_t)h * hs; }
    __host__ __device__ size_t k(int kvh) const { return (size_t)(NH + kvh) * hs; }
    __host__ __device__ size_t v(int kvh) const { return (size_t)(NH + NKV + kvh) * hs; }
};

enum { B_ROWS, B_TRANSPOSED };

// One warp: C (16 x N, fp32, row stride ldc) = A (16 x K, floatX, row-major) * B (K x N) [+ C],
// N and K multiples of 16, all in shared memory. B is read row-major, B(k,n) = B[k*ldb + n]
// (B_ROWS), or as the transpose of a row-major N x K matrix, B(k,n) = B[n*ldb + k] (B_TRANSPOSED).
// The caller separates it from lane-wise reads and writes of the same tiles with __syncwarp().
template <int LAYOUT>
__device__ void warp_mma(float* Cs, int ldc, const floatX* As, int lda, const floatX* Bs, int ldb, int N, int K, bool accumulate) {
#if defined(ENABLE_FP32)
    // lane n computes column n (and n + 32, ...) for all 16 rows; A is read by broadcast
    for (int n = threadIdx.x % 32; n < N; n += 32) {
        float acc[16];
        for (int r = 0; r < 16; r++) acc[r] = accumulate ? Cs[r * ldc + n] : 0.0f;
        for (int k = 0; k < K; k++) {
            float b = LAYOUT == B_ROWS ? Bs[k * ldb + n] : Bs[n * ldb + k];
            for (int r = 0; r < 16; r++) acc[r] += As[r * lda + k] * b;
        }
        for (int r = 0; r < 16; r++) Cs[r * ldc + n] = acc[r];
    }
#else
    using namespace nvcuda;
    typedef typename std::conditional<LAYOUT == B_ROWS, wmma::row_major, wmma::col_major>::type BLayout;
    for (int n0 = 0; n0 < N; n0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
        if (accumulate) wmma::load_matrix_sync(c, Cs + n0, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(c, 0.0f);
        for (int k0 = 0; k0 < K; k0 += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, floatX, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, floatX, BLayout> b;
            wmma::load_matrix_sync(a, As + k0, lda);
            // col_major: element (k, n) of the 16x16 block at ptr[k + n*ldb]
            wmma::load_matrix_sync(b, LAYOUT == B_ROWS ? Bs + k0 * ldb + n0 : Bs + n0 * ldb + k0, ldb);
            wmma::mma_sync(c, a, b, c);
        }
        wmma::store_matrix_sync(Cs + n0, c, ldc, wmma::mem_row_major);
    }
#endif
}

// Copies rows t0 .. t0+63 (columns 0 .. hs-1) of a matrix with row stride ld_src into a
// shared tile with row stride att_ldx(hs); rows at or beyond T are zero. All threads of the block.
__device__ void att_load_tile(floatX* dst, const floatX* src, size_t ld_src, int t0, int T, int hs) {
    int chunks = hs / X_PER_PACK, ldx = att_ldx(hs);
    for (int i = threadIdx.x; i < ATT_TILE * chunks; i += blockDim.x) {
        int r = i / chunks, c = (i % chunks) * X_PER_PACK;
        int4 v = make_int4(0, 0, 0, 0); // all-zero bits are 0.0 in every floatX
        if (t0 + r < T) v = *(const int4*)(src + (size_t)(t0 + r) * ld_src + c);
        *(int4*)(dst + r * ldx + c) = v;
    }
}

// scores are scaled by log2(e) / sqrt(hs) and exponentiated with exp2f; one function, so that
// backward recomputes exactly forward's scaled scores
__device__ inline float att_log2_scale(int hs) { return 1.4426950408889634f / sqrtf((float)hs); }

// out (B,T,C) = softmax(q k^T / sqrt(hs), causal) v per head, C = NH hs; lse (B,NH,T) = log2 of
// the sum of exp2(s * log2(e) / sqrt(hs)) over the query's keys (base-2 log-sum-exp, for
// backward). qkv (B,T,QKV): the heads' columns as AttHeads says.
// grid (ceil(T/64), B*NH), block ATT_THREADS: 64 queries of one (b, h), the longest rows first.
__global__ void __launch_bounds__(ATT_THREADS) attention_forward_kernel(floatX* out, float* lse, const floatX* qkv, int T, AttHeads hd) {
    extern __shared__ __align__(128) char smem[];
    int NH = hd.NH, hs = hd.hs, C = NH * hs;
    const AttSmem L = ATT_FWD_LAYOUT(hs);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int qt = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / NH, h = blockIdx.y % NH, kvh = h / hd.group();
    int q0 = qt * ATT_TILE, ldx = att_ldx(hs), lda = att_lda(hs);
    floatX *Qs = (floatX*)(smem + L.tile[0]), *Ks = (floatX*)(smem + L.tile[1]), *Vs = (floatX*)(smem + L.tile[2]);
    float* S = (float*)(smem + L.score + warp * L.score_stride);
    floatX* P = (floatX*)(smem + L.prob + warp * L.prob_stride);
    float* O = (float*)(smem + L.acc[0] + warp * L.acc_stride);
    size_t QKV = hd.row();
    const floatX* seq = qkv + (size_t)b * T * QKV;
    att_load_tile(Qs, seq + hd.q(h), QKV, q0, T, hs);
    for (int i = lane; i < 16 * hs; i += 32) O[(i / hs) * lda + i % hs] = 0.0f;
    int r = lane / 2, half = lane % 2;     // this lane's row of the warp's tile, and which 32 columns
    int tq = q0 + warp * 16 + r;           // its query
    float scale = att_log2_scale(hs), m = -INFINITY, l = 0.0f;
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * ATT_TILE;
        __syncthreads(); // every warp is done with the previous K, V (and Q is loaded)
        att_load_tile(Ks, seq + hd.k(kvh), QKV, k0, T, hs);
        att_load_tile(Vs, seq + hd.v(kvh), QKV, k0, T, hs);
        __syncthreads();
        warp_mma<B_TRANSPOSED>(S, ATT_LDS, Qs + warp * 16 * ldx, ldx, Ks, ldx, ATT_TILE, hs, false);
        __syncwarp();
        // online softmax: key 0 is in every row's first tile, so m is finite from the first tile on
        float s[32], tile_max = -INFINITY;
        #pragma unroll
        for (int j = 0; j < 32; j++) {
            int c = half * 32 + j;
            s[j] = k0 + c <= tq ? S[r * ATT_LDS + c] * scale : -INFINITY;
            tile_max = fmaxf(tile_max, s[j]);
        }
        float m_new = fmaxf(m, fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1)));
        float alpha = exp2f(m - m_new), row_sum = 0.0f; // alpha = 0 on the first tile
        #pragma unroll
        for (int j = 0; j < 32; j++) {
            float p = exp2f(s[j] - m_new);
            row_sum += p;
            P[r * ATT_LDP + half * 32 + j] = to_floatX(p);
        }
        l = l * alpha + row_sum + __shfl_xor_sync(0xffffffffu, row_sum, 1);
        m = m_new;
        for (int d = half; d < hs; d += 2) O[r * lda + d] *= alpha;
        __syncwarp();
        warp_mma<B_ROWS>(O, lda, P, ATT_LDP, Vs, ldx, hs, ATT_TILE, true);
    }
    __syncwarp();
    if (tq < T) {
        floatX* o = out + ((size_t)b * T + tq) * C + h * hs;
        for (int d = half; d < hs; d += 2) o[d] = to_floatX(O[r * lda + d] / l);
        if (half == 0) lse[((size_t)b * NH + h) * T + tq] = m + log2f(l);
    }
}

// D (B,NH,T) = sum over the head's channels of dout * out, both (B,T,C); one warp per (b, t, h)
__global__ void attention_backward_prep_kernel(float* D, const floatX* dout, const floatX* out, int BT, int T, int C, int NH, int hs) {
    size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (w >= (size_t)BT * NH) return;
    int h = (int)(w % NH);
    size_t bt = w / NH, off = bt * C + h * hs;
    float s = 0.0f;
    for (int d = lane; d < hs; d += 32) s += to_float(dout[off + d]) * to_float(out[off + d]);
    s = warp_sum(s);
    if (lane == 0) D[((bt / T) * NH + h) * T + bt % T] = s;
}

// dK and dV (the k and v parts of dqkv (B,T,QKV)) of 64 keys of one (b, key/value head): for
// each query head of its group in order, over the query tiles from the diagonal on, with
// S^T = K Q^T, P^T = exp2(S^T scale - lse), dV += P^T dO, dP^T = V dO^T,
// dS^T = P^T (dP^T - D) / sqrt(hs), dK += dS^T Q.
// grid (ceil(T/64), B*NKV), block ATT_THREADS; warp w owns keys k0 + 16w .. k0 + 16w + 15.
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_dkdv_kernel(floatX* dqkv, const floatX* dout, const floatX* qkv, const float* lse, const float* D,
                                                                              int T, AttHeads hd) {
    extern __shared__ __align__(128) char smem[];
    int NH = hd.NH, hs = hd.hs, C = NH * hs;
    const AttSmem L = ATT_DKDV_LAYOUT(hs);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int kt = blockIdx.x, b = blockIdx.y / hd.NKV, kvh = blockIdx.y % hd.NKV;
    int k0 = kt * ATT_TILE, ldx = att_ldx(hs), lda = att_lda(hs);
    floatX *Ks = (floatX*)(smem + L.tile[0]), *Vs = (floatX*)(smem + L.tile[1]), *Qs = (floatX*)(smem + L.tile[2]), *dOs = (floatX*)(smem + L.tile[3]);
    float *lse_s = (float*)(smem + L.rowvec[0]), *D_s = (float*)(smem + L.rowvec[1]);
    float* S = (float*)(smem + L.score + warp * L.score_stride);
    floatX* P = (floatX*)(smem + L.prob + warp * L.prob_stride);
    float *dK = (float*)(smem + L.acc[0] + warp * L.acc_stride), *dV = (float*)(smem + L.acc[1] + warp * L.acc_stride);
    size_t QKV = hd.row();
    const floatX* seq = qkv + (size_t)b * T * QKV;
    att_load_tile(Ks, seq + hd.k(kvh), QKV, k0, T, hs);
    att_load_tile(Vs, seq + hd.v(kvh), QKV, k0, T, hs);
    for (int i = lane; i < 16 * hs; i += 32) { dK[(i / hs) * lda + i % hs] = 0.0f; dV[(i / hs) * lda + i % hs] = 0.0f; }
    int r = lane / 2, half = lane % 2;
    int tk = k0 + warp * 16 + r; // this lane's key
    float scale = 1.0f / sqrtf((float)hs), scale2 = att_log2_scale(hs);
    int num_tiles = (T + ATT_TILE - 1) / ATT_TILE;
    for (int h = kvh * hd.group(); h < (kvh + 1) * hd.group(); h++) {
        const floatX* dO = dout + (size_t)b * T * C + h * hs;
        const float *lse_bh = lse + ((size_t)b * NH + h) * T, *D_bh = D + ((size_t)b * NH + h) * T;
        for (int qt = kt; qt < num_tiles; qt++) {
            int q0 = qt * ATT_TILE;
            __syncthreads(); // every warp is done with the previous Q, dO, lse, D
            att_load_tile(Qs, seq + hd.q(h), QKV, q0, T, hs);
            att_load_tile(dOs, dO, C, q0, T, hs);
            if (threadIdx.x < ATT_TILE) {
                int t = q0 + threadIdx.x;
                lse_s[threadIdx.x] = t < T ? lse_bh[t] : 0.0f;
                D_s[threadIdx.x] = t < T ? D_bh[t] : 0.0f;
            }
            __syncthreads();
            warp_mma<B_TRANSPOSED>(S, ATT_LDS, Ks + warp * 16 * ldx, ldx, Qs, ldx, ATT_TILE, hs, false); // S^T
            __syncwarp();
            float p[32];
            #pragma unroll
            for (int j = 0; j < 32; j++) {
                int c = half * 32 + j, tq = q0 + c;
                p[j] = tk <= tq && tq < T ? exp2f(S[r * ATT_LDS + c] * scale2 - lse_s[c]) : 0.0f;
                P[r * ATT_LDP + c] = to_floatX(p[j]);
            }
            __syncwarp();
            warp_mma<B_ROWS>(dV, lda, P, ATT_LDP, dOs, ldx, hs, ATT_TILE, true);                     // dV += P^T dO
            __syncwarp(); // FP32: every lane has read P, which the next product overwrites
            warp_mma<B_TRANSPOSED>(S, ATT_LDS, Vs + warp * 16 * ldx, ldx, dOs, ldx, ATT_TILE, hs, false); // dP^T = V dO^T
            __syncwarp();
            #pragma unroll
            for (int j = 0; j < 32; j++) {
                int c = half * 32 + j;
                P[r * ATT_LDP + c] = to_floatX(p[j] * (S[r * ATT_LDS + c] - D_s[c]) * scale); // dS^T
            }
            __syncwarp();
            warp_mma<B_ROWS>(dK, lda, P, ATT_LDP, Qs, ldx, hs, ATT_TILE, true);                      // dK += dS^T Q
        }
    }
    __syncwarp();
    if (tk < T) {
        floatX* d = dqkv + ((size_t)b * T + tk) * QKV;
        for (int i = half; i < hs; i += 2) {
            d[hd.k(kvh) + i] = to_floatX(dK[r * lda + i]);
            d[hd.v(kvh) + i] = to_floatX(dV[r * lda + i]);
        }
    }
}

// dQ (the q part of dqkv (B,T,QKV)) of 64 queries of one (b, h): over the key tiles up to the
// diagonal, with S = Q K^T, P = exp2(S scale - lse), dP = dO V^T, dS = P (dP - D) / sqrt(hs),
// dQ += dS K. grid (ceil(T/64), B*NH), the longest rows first; warp w owns 16 of the queries.
__global__ void __launch_bounds__(ATT_THREADS) attention_backward_dq_kernel(floatX* dqkv, const floatX* dout, const floatX* qkv, const float* lse, const float* D,
                                                                            int T, AttHeads hd) {
    extern __shared__ __align__(128) char smem[];
    int NH = hd.NH, hs = hd.hs, C = NH * hs;
    const AttSmem L = ATT_DQ_LAYOUT(hs);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int qt = gridDim.x - 1 - blockIdx.x, b = blockIdx.y / NH, h = blockIdx.y % NH, kvh = h / hd.group();
    int q0 = qt * ATT_TILE, ldx = att_ldx(hs), lda = att_lda(hs);
    floatX *Qs = (floatX*)(smem + L.tile[0]), *dOs = (floatX*)(smem + L.tile[1]), *Ks = (floatX*)(smem + L.tile[2]), *Vs = (floatX*)(smem + L.tile[3]);
    float *lse_s = (float*)(smem + L.rowvec[0]), *D_s = (float*)(smem + L.rowvec[1]);
    float* S = (float*)(smem + L.score + warp * L.score_stride);
    floatX* P = (floatX*)(smem + L.prob + warp * L.prob_stride);
    float* dQ = (float*)(smem + L.acc[0] + warp * L.acc_stride);
    size_t QKV = hd.row();
    const floatX* seq = qkv + (size_t)b * T * QKV;
    att_load_tile(Qs, seq + hd.q(h), QKV, q0, T, hs);
    att_load_tile(dOs, dout + (size_t)b * T * C + h * hs, C, q0, T, hs);
    if (threadIdx.x < ATT_TILE) {
        int t = q0 + threadIdx.x;
        lse_s[threadIdx.x] = t < T ? lse[((size_t)b * NH + h) * T + t] : 0.0f;
        D_s[threadIdx.x] = t < T ? D[((size_t)b * NH + h) * T + t] : 0.0f;
    }
    for (int i = lane; i < 16 * hs; i += 32) dQ[(i / hs) * lda + i % hs] = 0.0f;
    int r = lane / 2, half = lane % 2, row = warp * 16 + r;
    int tq = q0 + row; // this lane's query
    float scale = 1.0f / sqrtf((float)hs), scale2 = att_log2_scale(hs);
    for (int kt = 0; kt <= qt; kt++) {
        int k0 = kt * ATT_TILE;
        __syncthreads(); // every warp is done with the previous K, V (and Q, dO, lse, D are loaded)
        att_load_tile(Ks, seq + hd.k(kvh), QKV, k0, T, hs);
        att_load_tile(Vs, seq + hd.v(kvh), QKV, k0, T, hs);
        __syncthreads();
        warp_mma<B_TRANSPOSED>(S, ATT_LDS, Qs + warp * 16 * ldx, ldx, Ks, ldx, ATT_TILE, hs, false); // S
        __syncwarp();
        float p[32];
        #pragma unroll
        for (int j = 0; j < 32; j++) {
            int c = half * 32 + j;
            p[j] = k0 + c <= tq && tq < T ? exp2f(S[r * ATT_LDS + c] * scale2 - lse_s[row]) : 0.0f;
        }
        __syncwarp();
        warp_mma<B_TRANSPOSED>(S, ATT_LDS, dOs + warp * 16 * ldx, ldx, Vs, ldx, ATT_TILE, hs, false); // dP
        __syncwarp();
        #pragma unroll
        for (int j = 0; j < 32; j++) {
            int c = half * 32 + j;
            P[r * ATT_LDP + c] = to_floatX(p[j] * (S[r * ATT_LDS + c] - D_s[row]) * scale); // dS
        }
        __syncwarp();
        warp_mma<B_ROWS>(dQ, lda, P, ATT_LDP, Ks, ldx, hs, ATT_TILE, true); // dQ += dS K
    }
    __syncwarp();
    if (tq < T) {
        floatX* d = dqkv + ((size_t)b * T + tq) * QKV + hd.q(h);
        for (int i = half; i < hs; i += 2) d[i] = to_floatX(dQ[r * lda + i]);
    }
}

// The head sizes the kernels take, and their shared memory opt-in; fails with the reason.
static void attention_setup(int hs) {
    if (hs % 16 != 0 || hs > 128) fatal("GPU trainer: head size %d (dim / heads) must be a multiple of 16 and at most 128 (the attention kernel's tiles)", hs);
    struct { const void* kernel; int bytes; } k[3] = {
        {(const void*)attention_forward_kernel, ATT_FWD_LAYOUT(hs).bytes},
        {(const void*)attention_backward_dkdv_kernel, ATT_DKDV_LAYOUT(hs).bytes},
        {(const void*)attention_backward_dq_kernel, ATT_DQ_LAYOUT(hs).bytes},
    };
    for (int i = 0; i < 3; i++) {
        if (k[i].bytes > (int)device_prop.sharedMemPerBlockOptin) {
            fatal("GPU trainer: head size %d needs %d bytes of shared memory per attention block, the device allows %zu (use a smaller head size)",
                  hs, k[i].bytes, (size_t)device_prop.sharedMemPerBlockOptin);
        }
        cudaCheck(cudaFuncSetAttribute(k[i].kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, k[i].bytes));
    }
}

// out (B,T,C), lse (B,NH,T) from qkv (B,T,QKV), C = NH hs
static void attention_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, AttHeads hd) {
    dim3 grid(ceil_div(T, ATT_TILE), B * hd.NH);
    attention_forward_kernel<<<grid, ATT_THREADS, ATT_FWD_LAYOUT(hd.hs).bytes, stream>>>(out, lse, qkv, T, hd);
    launchCheck();
}

// dqkv (B,T,QKV) = gradient from dout (B,T,C), given qkv, out and lse of the forward; D (B,NH,T) is scratch
static void attention_backward(floatX* dqkv, float* D, const floatX* dout, const floatX* qkv, const floatX* out, const float* lse, int B, int T, AttHeads hd) {
    int NH = hd.NH, hs = hd.hs;
    size_t warps = (size_t)B * T * NH;
    attention_backward_prep_kernel<<<ceil_div(warps * 32, 256), 256, 0, stream>>>(D, dout, out, B * T, T, NH * hs, NH, hs);
    launchCheck();
    attention_backward_dkdv_kernel<<<dim3(ceil_div(T, ATT_TILE), B * hd.NKV), ATT_THREADS, ATT_DKDV_LAYOUT(hs).bytes, stream>>>(dqkv, dout, qkv, lse, D, T, hd);
    launchCheck();
    attention_backward_dq_kernel<<<dim3(ceil_div(T, ATT_TILE), B * NH), ATT_THREADS, ATT_DQ_LAYOUT(hs).bytes, stream>>>(dqkv, dout, qkv, lse, D, T, hd);
    launchCheck();
}

// ----------------------------------------------------------------------------
// rope: rotary position embeddings (LLaMA), in transformers' rotate_half layout: channel i
// of the first half of a head pairs with channel i + hs/2, rotated by t * theta^(-2i/hs).
// The tables come from dstrain.h's rope_tables, the CPU trainer's, uploaded once.
// One pass over q and k, in place, after the qkv product: attention's backward needs the
// rotated q and k anyway, and rotating them at each tile load instead would redo it for every
// query tile that reads a key tile.

// Rotates the q and k heads of qkv (B,T,QKV) in place: x1' = x1 cos - x2 sin,
// x2' = x2 cos + x1 sin (x1, x2: a head's two halves); direction -1 rotates back, which is
// the backward pass on dqkv (a rotation's transpose is its inverse). cos, sin (T, hs/2).
// One thread per (b, t, head, i < hs/2), over the NH + NKV q and k heads, which are contiguous.
__global__ void rope_kernel(floatX* qkv, const float* cos_t, const float* sin_t, int BT, int T, AttHeads hd, float direction) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int half = hd.hs / 2, heads = hd.NH + hd.NKV;
    if (i >= (size_t)BT * heads * half) return;
    int c = (int)(i % half), h = (int)(i / half % heads);
    size_t bt = i / half / heads;
    int t = (int)(bt % T);
    floatX* x = qkv + bt * hd.row() + (size_t)h * hd.hs;
    float x1 = to_float(x[c]), x2 = to_float(x[c + half]);
    float cs = cos_t[t * half + c], sn = direction * sin_t[t * half + c];
    x[c] = to_floatX(x1 * cs - x2 * sn);
    x[c + half] = to_floatX(x2 * cs + x1 * sn);
}

static void rope_rotate(floatX* qkv, const float* cos_t, const float* sin_t, int B, int T, AttHeads hd, float direction) {
    size_t n = (size_t)B * T * (hd.NH + hd.NKV) * (hd.hs / 2);
    rope_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(qkv, cos_t, sin_t, B * T, T, hd, direction);
    launchCheck();
}

// ----------------------------------------------------------------------------
// gelu (tanh approximation)

#define GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)

// out (N) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); one thread per pack
__global__ void gelu_forward_kernel(floatX* out, const floatX* inp, size_t N) {
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * X_PER_PACK;
    if (i >= N) return;
    PackX x = *(const PackX*)(inp + i), o;
    for (int k = 0; k < X_PER_PACK; k++) {
        float v = to_float(x.v[k]);
        o.v[k] = to_floatX(0.5f * v * (1.0f + tanhf(GELU_SCALE * (v + 0.044715f * v * v * v))));
    }
    *(PackX*)(out + i) = o;
}

// d (N) = GELU'(inp) * d, in place: the gradient of the GELU output becomes that of its input
__global__ void gelu_backward_kernel(floatX* d, const floatX* inp, size_t N) {
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * X_PER_PACK;
    if (i >= N) return;
    PackX x = *(const PackX*)(inp + i), g = *(const PackX*)(d + i);
    for (int k = 0; k < X_PER_PACK; k++) {
        float v = to_float(x.v[k]);
        float th = tanhf(GELU_SCALE * (v + 0.044715f * v * v * v));
        float grad = 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_SCALE * (1.0f + 3.0f * 0.044715f * v * v);
        g.v[k] = to_floatX(grad * to_float(g.v[k]));
    }
    *(PackX*)(d + i) = g;
}

static void gelu_forward(floatX* out, const floatX* inp, size_t N) {
    gelu_forward_kernel<<<ceil_div(N / X_PER_PACK, 256), 256, 0, stream>>>(out, inp, N);
    launchCheck();
}

static void gelu_backward(floatX* d, const floatX* inp, size_t N) {
    gelu_backward_kernel<<<ceil_div(N / X_PER_PACK, 256), 256, 0, stream>>>(d, inp, N);
    launchCheck();
}

// ----------------------------------------------------------------------------
// swiglu (LLaMA's MLP): silu(gate) * up. One thread per element: F need not be a multiple
// of a pack (the reference model's 172 is not).

// out (N,F) = silu(gate) * up, gate and up the two halves of each row of fch (N,2F) (the fused
// [gate_proj; up_proj] product); silu(x) = x * sigmoid(x)
__global__ void swiglu_forward_kernel(floatX* out, const floatX* fch, int N, int F) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * F) return;
    size_t n = i / F, c = i % F;
    float gate = to_float(fch[n * 2 * F + c]), up = to_float(fch[n * 2 * F + F + c]);
    out[i] = to_floatX(gate * (1.0f / (1.0f + expf(-gate))) * up);
}

// dfch (N,2F) = the gradient of (gate, up) from dout (N,F), given fch (written, not added:
// the product that follows reads it whole)
__global__ void swiglu_backward_kernel(floatX* dfch, const floatX* fch, const floatX* dout, int N, int F) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * F) return;
    size_t n = i / F, c = i % F;
    float gate = to_float(fch[n * 2 * F + c]), up = to_float(fch[n * 2 * F + F + c]), d = to_float(dout[i]);
    float sig = 1.0f / (1.0f + expf(-gate));
    dfch[n * 2 * F + c] = to_floatX(d * up * sig * (1.0f + gate * (1.0f - sig))); // silu' = sig (1 + x (1 - sig))
    dfch[n * 2 * F + F + c] = to_floatX(d * (gate * sig));
}

static void swiglu_forward(floatX* out, const floatX* fch, int N, int F) {
    swiglu_forward_kernel<<<ceil_div((size_t)N * F, 256), 256, 0, stream>>>(out, fch, N, F);
    launchCheck();
}

static void swiglu_backward(floatX* dfch, const floatX* fch, const floatX* dout, int N, int F) {
    swiglu_backward_kernel<<<ceil_div((size_t)N * F, 256), 256, 0, stream>>>(dfch, fch, dout, N, F);
    launchCheck();
}

// ----------------------------------------------------------------------------
// classifier: softmax over the V real tokens of the padded (N,Vp) logits and cross-entropy.
// Forward reads each row once and keeps its log-sum-exp; backward turns the logits into
// their gradient in place in one pass. (The gradient cannot be written by forward: its
// scale, loss scale / (ga * N), is an argument of backward.)

#define CLASSIFIER_THREADS 512

// lse (N) = log sum over i < V of exp(logits[n,i]); with targets, losses (N) = lse - logits[n,target].
// One block per row; each thread keeps a running (max, sum) over its packs.
__global__ void __launch_bounds__(CLASSIFIER_THREADS) classifier_forward_kernel(float* losses, float* lse, const floatX* logits, const int* targets, int V, int Vp) {
    const floatX* x = logits + (size_t)blockIdx.x * Vp;
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x * X_PER_PACK; i < Vp; i += blockDim.x * X_PER_PACK) {
        PackX v = *(const PackX*)(x + i);
        float pack_max = -INFINITY;
        for (int k = 0; k < X_PER_PACK; k++) if (i + k < V) pack_max = fmaxf(pack_max, to_float(v.v[k]));
        if (pack_max == -INFINITY) continue; // only padding columns
        if (pack_max > m) { s *= expf(m - pack_max); m = pack_max; }
        for (int k = 0; k < X_PER_PACK; k++) if (i + k < V) s += expf(to_float(v.v[k]) - m);
    }
    float row_max = block_max(m);
    float row_sum = block_sum(m == -INFINITY ? 0.0f : s * expf(m - row_max));
    if (threadIdx.x == 0) {
        float l = row_max + logf(row_sum);
        lse[blockIdx.x] = l;
        if (targets) losses[blockIdx.x] = l - to_float(x[targets[blockIdx.x]]);
    }
}

// logits (N,Vp) := (softmax - onehot(target)) * dloss, padding columns 0; one block per row
__global__ void __launch_bounds__(CLASSIFIER_THREADS) classifier_backward_kernel(floatX* logits, const float* lse, const int* targets, float dloss, int V, int Vp) {
    floatX* x = logits + (size_t)blockIdx.x * Vp;
    float l = lse[blockIdx.x];
    int target = targets[blockIdx.x];
    for (int i = threadIdx.x * X_PER_PACK; i < Vp; i += blockDim.x * X_PER_PACK) {
        PackX v = *(const PackX*)(x + i);
        for (int k = 0; k < X_PER_PACK; k++) {
            float p = i + k < V ? expf(to_float(v.v[k]) - l) : 0.0f;
            v.v[k] = to_floatX((p - (i + k == target ? 1.0f : 0.0f)) * dloss);
        }
        *(PackX*)(x + i) = v;
    }
}

static void classifier_forward(float* losses, float* lse, const floatX* logits, const int* targets, int N, int V, int Vp) {
    classifier_forward_kernel<<<N, CLASSIFIER_THREADS, 0, stream>>>(losses, lse, logits, targets, V, Vp);
    launchCheck();
}

// *sum += the mean of losses (N), rounded to float as the CPU trainer's mean loss is: one
// block, a fixed order. The step reads the sum once, with its gradient statistics.
__global__ void __launch_bounds__(512) loss_accumulate_kernel(double* sum, const float* losses, int N) {
    double s = 0.0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) s += losses[i];
    s = block_sum(s);
    if (threadIdx.x == 0) *sum += (float)(s / N);
}

static void loss_accumulate(double* sum, const float* losses, int N) {
    loss_accumulate_kernel<<<1, 512, 0, stream>>>(sum, losses, N);
    launchCheck();
}

static void classifier_backward(floatX* logits, const float* lse, const int* targets, float dloss, int N, int V, int Vp) {
    classifier_backward_kernel<<<N, CLASSIFIER_THREADS, 0, stream>>>(logits, lse, targets, dloss, V, Vp);
    launchCheck();
}

// ----------------------------------------------------------------------------
// the model: GPT-2 and LLaMA in one layer loop, as in train_gpt.c (parameter layout and
// initialisation: dstrain.h, param_table). The architectures differ in three places, each an
// `if` below:
//   norm        LayerNorm with bias (GPT-2)       RMSNorm (LLaMA)
//   positions   learned wpe added to the input    rotary, applied to q and k
//   MLP         GELU(fc(x))                       silu(gate(x)) * up(x)
// and LLaMA has no biases, grouped-query attention and (unless tied) its own lm_head.

template <typename T> struct LayerWeights {
    T *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb; // GPT-2's slots; LLaMA's biases NULL
};

#define NO_TENSOR SIZE_MAX // an offset of a tensor the architecture does not have

// Where the tensors are in the flat buffer (element offsets, from dstrain.h's table). The
// layers are contiguous and alike, so one layer's tensors are found from its start: the
// weights in the model's floatX buffer and the gradient regions ZeRO hands to backward.
typedef struct {
    size_t wte, wte_n;                   // token embedding (Vp,C)
    size_t wpe, wpe_n;                   // position embedding: GPT-2; NO_TENSOR, 0 for LLaMA
    size_t layer0, layer_n;              // layer l's parameters: [layer0 + l layer_n, + layer_n)
    size_t in_layer[GPT2_LAYER_TENSORS]; // in LayerWeights' slots; NO_TENSOR where the architecture has none
    size_t lnf, lnf_n;                   // lnfw (C), then GPT-2's lnfb (C)
    size_t lm_head;                      // the classifier's weights (Vp,C): wte when tied
} Layout;

static void model_layout(Layout* o, const ModelConfig* c) {
    ParamTable t = param_table(c);
    const ParamTensor *wte = param_named(&t, "wte"), *wpe = param_find(&t, "wpe"), *lnfb = param_find(&t, "lnfb"), *lm_head = param_find(&t, "lm_head");
    o->wte = wte->offset; o->wte_n = wte->size;
    o->wpe = wpe ? wpe->offset : NO_TENSOR; o->wpe_n = wpe ? wpe->size : 0;
    o->layer0 = param_layer(&t, 0, 0)->offset;
    o->layer_n = 0;
    for (int i = 0; i < GPT2_LAYER_TENSORS; i++) o->in_layer[i] = NO_TENSOR;
    for (int i = 0; i < t.per_layer; i++) {
        o->in_layer[c->arch == ARCH_LLAMA ? LLAMA_GPT2_SLOT[i] : i] = param_layer(&t, 0, i)->offset - o->layer0;
        o->layer_n += param_layer(&t, 0, i)->size;
    }
    o->lnf = param_named(&t, "lnfw")->offset;
    o->lnf_n = (lnfb ? 2 : 1) * (size_t)c->channels;
    o->lm_head = lm_head ? lm_head->offset : o->wte;
    for (int l = 0; l < c->num_layers; l++) {
        for (int i = 0; i < t.per_layer; i++) {
            if (param_layer(&t, l, i)->offset - param_layer(&t, 0, i)->offset != l * o->layer_n) fatal("internal: the layers are not alike in the flat layout");
        }
    }
    param_table_free(&t);
}

// Points a layer's tensors into `base`, the first element of the layer (weights or gradients).
template <typename T> static void point_layer(LayerWeights<T>* lw, T* base, const Layout* o) {
    T** p = (T**)lw;
    for (int i = 0; i < GPT2_LAYER_TENSORS; i++) p[i] = o->in_layer[i] == NO_TENSOR ? NULL : base + o->in_layer[i];
}


// Activations kept by forward for backward, per layer (a layer's slice starts at a multiple
// of 128 elements). With --recompute, ln1, ln2 and fch_act hold one layer and backward
// recomputes them. Then the backward scratch, one layer's worth, reused by every layer.
// QKV = qkv_width, F2 = fc_width (dstrain.h). A tensor the architecture does not use is NULL.
typedef struct {
    floatX* encoded;     // (B,T,C): layer 0's input
    floatX* ln1;         // (L,B,T,C)
    float* ln1_mean;     // (L,B,T) GPT-2
    float* ln1_rstd;     // (L,B,T)
    floatX* qkv;         // (L,B,T,QKV), q and k rotated (LLaMA)
    floatX* atty;        // (L,B,T,C)
    float* att_lse;      // (L,B,NH,T)
    floatX* residual2;   // (L,B,T,C)
    floatX* ln2;         // (L,B,T,C)
    float* ln2_mean;     // (L,B,T) GPT-2
    float* ln2_rstd;     // (L,B,T)
    floatX* fch;         // (L,B,T,F2) before the activation
    floatX* fch_act;     // (L,B,T,F) GELU(fch) or silu(gate) * up
    floatX* residual3;   // (L,B,T,C): layer l's output, layer l+1's input
    floatX* lnf;         // (B,T,C)
    float* lnf_mean;     // (B,T) GPT-2
    float* lnf_rstd;     // (B,T)
    floatX* logits;      // (B,T,Vp), turned into their gradient by backward
    float* logits_lse;   // (B,T)
    float* losses;       // (B,T)
    // backward scratch
    floatX* dresidual;   // (B,T,C): the residual stream's gradient
    floatX* dln;         // (B,T,C): gradient of a norm output
    floatX* datty;       // (B,T,C)
    floatX* dqkv;        // (B,T,QKV)
    floatX* dfch;        // (B,T,F2): of fch (GPT-2: of fch_act first, GELU's backward is in place)
    floatX* dfch_act;    // (B,T,F): of fch_act (LLaMA)
    float* att_D;        // (B,NH,T)
    float* colsum;       // column-sum partials
} Activations;

// elements from one layer's slice of a per-layer tensor to the next
typedef struct { size_t C, QKV, F2, F, N, lse; } LayerStrides;

static LayerStrides layer_strides(const ModelConfig* c, int B, int T) {
    size_t BT = (size_t)B * T;
    LayerStrides s = {round_up(BT * c->channels, 128), round_up(BT * qkv_width(c), 128), round_up(BT * fc_width(c), 128),
                      round_up(BT * c->ffn_hidden, 128), round_up(BT, 128), round_up(BT * c->num_heads, 128)};
    return s;
}

typedef struct { void** ptr; size_t count, elem_size; } ActTensor;
#define ACT_TENSOR(field, count) {(void**)&a->field, (count), sizeof(*a->field)}
#define MAX_ACT_TENSORS 32

// The activation tensors of config c at capacity (B, T) into t: where each pointer goes and
// its size (count 0: not in this architecture). Returns how many. Allocation, freeing and
// --plan all walk this one list.
static int activation_tensors(ActTensor* t, Activations* a, const ModelConfig* c, int B, int T, int recompute) {
    LayerStrides s = layer_strides(c, B, T);
    size_t L = c->num_layers, Lr = recompute ? 1 : L; // layers kept of what --recompute recomputes
    size_t BT = (size_t)B * T, C = c->channels, F = c->ffn_hidden, Vp = c->padded_vocab_size;
    size_t gpt2 = c->arch == ARCH_GPT2, llama = c->arch == ARCH_LLAMA;
    size_t widest_sum = gpt2 ? F : C; // the column sums: biases up to F wide (GPT-2), norm weights C
    ActTensor list[] = {
        ACT_TENSOR(encoded, BT * C), ACT_TENSOR(ln1, Lr * s.C), ACT_TENSOR(ln1_mean, gpt2 * L * s.N), ACT_TENSOR(ln1_rstd, L * s.N),
        ACT_TENSOR(qkv, L * s.QKV), ACT_TENSOR(atty, L * s.C), ACT_TENSOR(att_lse, L * s.lse), ACT_TENSOR(residual2, L * s.C),
        ACT_TENSOR(ln2, Lr * s.C), ACT_TENSOR(ln2_mean, gpt2 * L * s.N), ACT_TENSOR(ln2_rstd, L * s.N), ACT_TENSOR(fch, L * s.F2),
        ACT_TENSOR(fch_act, Lr * s.F), ACT_TENSOR(residual3, L * s.C), ACT_TENSOR(lnf, BT * C), ACT_TENSOR(lnf_mean, gpt2 * BT),
        ACT_TENSOR(lnf_rstd, BT), ACT_TENSOR(logits, BT * Vp), ACT_TENSOR(logits_lse, BT), ACT_TENSOR(losses, BT),
        ACT_TENSOR(dresidual, BT * C), ACT_TENSOR(dln, BT * C), ACT_TENSOR(datty, BT * C), ACT_TENSOR(dqkv, BT * qkv_width(c)),
        ACT_TENSOR(dfch, BT * fc_width(c)), ACT_TENSOR(dfch_act, llama * BT * F), ACT_TENSOR(att_D, BT * c->num_heads),
        ACT_TENSOR(colsum, column_sums_scratch_floats((int)BT, (int)widest_sum)),
    };
    int n = (int)(sizeof(list) / sizeof(list[0]));
    if (n > MAX_ACT_TENSORS) fatal("internal: more than %d activation tensors", MAX_ACT_TENSORS);
    memcpy(t, list, sizeof list);
    return n;
}

// bytes of the activations and backward scratch, as model_build allocates them
static size_t activations_bytes(const ModelConfig* c, int B, int T, int recompute) {
    Activations a;
    ActTensor t[MAX_ACT_TENSORS];
    int n = activation_tensors(t, &a, c, B, T, recompute);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += round_up(t[i].count * t[i].elem_size, 256);
    return total;
}

typedef struct {
    ModelConfig config;
    Layout layout;
    AttHeads heads;
    size_t num_params;
    int max_B, max_T, recompute;
    floatX* params;        // the working weights the kernels read (ZeRO keeps the fp32 master)
    float *rope_cos, *rope_sin; // (max_T, hs/2) LLaMA
    Activations act;
    size_t act_bytes;      // activations and backward scratch
    LayerStrides stride;
    int* inputs;           // (B,T) on the device
    int* targets;          // (B,T) on the device
    int last_B, last_T;    // of the last forward
    TokenBuckets buckets;  // encoder backward: the last forward's tokens sorted into buckets
    int num_buckets;
    double* loss_sum;      // device: the mean losses of the forwards since model_take_loss
    double* loss_sum_host; // pinned: its copy after each forward, complete at loss_copied
    cudaEvent_t loss_copied;
    floatX* logits_row;    // pinned (Vp): for probs
    float* probs_host;     // (Vp)
} Model;

// one device buffer of `count` elements, counted in *total (if not NULL)
template <typename T> static T* device_alloc(size_t count, size_t* total) {
    T* p;
    size_t bytes = round_up(count * sizeof(T), 256);
    cudaCheck(cudaMalloc(&p, bytes));
    if (total) *total += bytes;
    return p;
}

static void activations_alloc(Model* m, int B, int T) {
    ActTensor t[MAX_ACT_TENSORS];
    int n = activation_tensors(t, &m->act, &m->config, B, T, m->recompute);
    m->stride = layer_strides(&m->config, B, T);
    m->act_bytes = 0;
    for (int i = 0; i < n; i++) *t[i].ptr = t[i].count ? device_alloc<char>(t[i].count * t[i].elem_size, &m->act_bytes) : NULL;
}

static void activations_free(Model* m) {
    ActTensor t[MAX_ACT_TENSORS];
    int n = activation_tensors(t, &m->act, &m->config, m->max_B, m->max_T, m->recompute);
    for (int i = 0; i < n; i++) cudaCheck(cudaFree(*t[i].ptr));
}

// Layer l's activations: its slices of the per-layer tensors.
typedef struct {
    const floatX* residual; // the layer's input: encoded, or the previous layer's residual3
    floatX *ln1, *qkv, *atty, *residual2, *ln2, *fch, *fch_act, *residual3;
    float *ln1_mean, *ln1_rstd, *lse, *ln2_mean, *ln2_rstd;
} LayerActivations;

// layer l's slice of tensor t, n elements per layer; NULL stays NULL (LLaMA has no means)
template <typename T> static T* layer_slice(T* t, size_t l, size_t n) { return t ? t + l * n : NULL; }

static LayerActivations layer_activations(const Model* m, int l) {
    const Activations* a = &m->act;
    const LayerStrides* s = &m->stride;
    size_t r = m->recompute ? 0 : (size_t)l; // what --recompute recomputes has one slice
    LayerActivations la;
    la.residual = l == 0 ? a->encoded : a->residual3 + (l - 1) * s->C;
    la.ln1 = a->ln1 + r * s->C;
    la.qkv = a->qkv + l * s->QKV;
    la.atty = a->atty + l * s->C;
    la.residual2 = a->residual2 + l * s->C;
    la.ln2 = a->ln2 + r * s->C;
    la.fch = a->fch + l * s->F2;
    la.fch_act = a->fch_act + r * s->F;
    la.residual3 = a->residual3 + l * s->C;
    la.ln1_mean = layer_slice(a->ln1_mean, l, s->N);
    la.ln1_rstd = a->ln1_rstd + l * s->N;
    la.lse = a->att_lse + l * s->lse;
    la.ln2_mean = layer_slice(a->ln2_mean, l, s->N);
    la.ln2_rstd = a->ln2_rstd + l * s->N;
    return la;
}

static void model_build(Model* m, const ModelConfig* c, int B, int T, int recompute) {
    cuda_setup();
    memset(m, 0, sizeof(*m));
    m->config = *c;
    m->max_B = B;
    m->max_T = T;
    m->recompute = recompute;
    if (T > c->max_seq_len) fatal("GPU trainer: sequence length %d exceeds the model's %d positions", T, c->max_seq_len);
    if ((size_t)B * c->num_heads > 65535) fatal("GPU trainer: micro batch %d x %d heads exceeds the attention grid's 65535 blocks", B, c->num_heads);
    m->heads = AttHeads{c->num_heads, c->num_kv_heads, c->channels / c->num_heads};
    attention_setup(m->heads.hs); // also makes C a multiple of 16, which the packed kernels need
    model_layout(&m->layout, c);
    m->num_params = model_num_params(c);
    size_t BT = (size_t)B * T;
    m->params = device_alloc<floatX>(m->num_params, NULL); // ZeRO's report counts the weights
    if (c->arch == ARCH_LLAMA) {
        size_t n = (size_t)T * (m->heads.hs / 2);
        float* host = (float*)mallocCheck(2 * n * sizeof(float));
        rope_tables(host, host + n, T, m->heads.hs, c->rope_theta);
        m->rope_cos = device_alloc<float>(2 * n, NULL);
        m->rope_sin = m->rope_cos + n;
        cudaCheck(cudaMemcpy(m->rope_cos, host, 2 * n * sizeof(float), cudaMemcpyHostToDevice));
        free(host);
    }
    activations_alloc(m, B, T);
    m->inputs = device_alloc<int>(BT, NULL);
    m->targets = device_alloc<int>(BT, NULL);
    token_buckets_init(&m->buckets, c->vocab_size, (int)BT);
    m->loss_sum = device_alloc<double>(1, NULL);
    cudaCheck(cudaMemset(m->loss_sum, 0, sizeof(double)));
    cudaCheck(cudaMallocHost(&m->loss_sum_host, sizeof(double)));
    *m->loss_sum_host = 0.0;
    cudaCheck(cudaEventCreateWithFlags(&m->loss_copied, cudaEventDisableTiming));
    cudaCheck(cudaMallocHost(&m->logits_row, c->padded_vocab_size * sizeof(floatX)));
    m->probs_host = (float*)callocCheck(c->padded_vocab_size, sizeof(float));
}

static void model_free(Model* m) {
    cudaCheck(cudaStreamSynchronize(stream));
    void* p[] = {m->params, m->rope_cos, m->inputs, m->targets, m->loss_sum};
    for (size_t i = 0; i < sizeof(p) / sizeof(p[0]); i++) cudaCheck(cudaFree(p[i]));
    activations_free(m);
    token_buckets_free(&m->buckets);
    cudaCheck(cudaFreeHost(m->loss_sum_host));
    cudaCheck(cudaEventDestroy(m->loss_copied));
    cudaCheck(cudaFreeHost(m->logits_row));
    free(m->probs_host);
    matmul_plans_free();
}

// the architecture's norm: LayerNorm (mean saved) or RMSNorm
static void norm_forward(const Model* m, floatX* out, float* mean, float* rstd, const floatX* inp, const floatX* w, const floatX* b, int N) {
    const ModelConfig* c = &m->config;
    if (c->arch == ARCH_LLAMA) rmsnorm_forward(out, rstd, inp, w, N, c->channels, c->norm_eps);
    else layernorm_forward(out, mean, rstd, inp, w, b, N, c->channels, c->norm_eps);
}

static void norm_backward(const Model* m, floatX* dinp, float* dw, float* db, const floatX* dout, const floatX* inp, const floatX* w,
                          const float* mean, const float* rstd, int N, float* scratch) {
    const ModelConfig* c = &m->config;
    if (c->arch == ARCH_LLAMA) rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, c->channels, scratch);
    else layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, c->channels, scratch);
}

// the MLP's activation: fch_act (N,F) = GELU(fch) or silu(gate) * up
static void mlp_activation_forward(const Model* m, floatX* fch_act, const floatX* fch, int N) {
    int F = m->config.ffn_hidden;
    if (m->config.arch == ARCH_LLAMA) swiglu_forward(fch_act, fch, N, F);
    else gelu_forward(fch_act, fch, (size_t)N * F);
}

// Runs the model on inputs (B,T); with targets, adds the mean loss to the loss sum that
// model_take_loss reads. The host does not wait for the device.
static void model_forward(Model* m, const int* inputs, const int* targets, int B, int T) {
    const ModelConfig* c = &m->config;
    const Layout* o = &m->layout;
    if (B > m->max_B || T > m->max_T) fatal("forward: batch (%d, %d) exceeds capacity (%d, %d)", B, T, m->max_B, m->max_T);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= c->vocab_size) fatal("input token %d at position %d is outside the vocabulary (%d)", inputs[i], i, c->vocab_size);
        if (targets && (targets[i] < 0 || targets[i] >= c->vocab_size)) fatal("target token %d at position %d is outside the vocabulary (%d)", targets[i], i, c->vocab_size);
    }
    int L = c->num_layers, C = c->channels, F = c->ffn_hidden, V = c->vocab_size, Vp = c->padded_vocab_size, llama = c->arch == ARCH_LLAMA;
    int QKV = (int)qkv_width(c), F2 = (int)fc_width(c);
    int BT = B * T;
    m->last_B = B;
    m->last_T = T;
    cudaCheck(cudaMemcpyAsync(m->inputs, inputs, BT * sizeof(int), cudaMemcpyHostToDevice, stream));
    if (targets) {
        cudaCheck(cudaMemcpyAsync(m->targets, targets, BT * sizeof(int), cudaMemcpyHostToDevice, stream));
        m->num_buckets = token_buckets_upload(&m->buckets, inputs, BT, V); // for backward, which then needs no host work
    }
    Activations* a = &m->act;
    encoder_forward(a->encoded, m->inputs, m->params + o->wte, o->wpe == NO_TENSOR ? NULL : m->params + o->wpe, B, T, C);
    for (int l = 0; l < L; l++) {
        LayerWeights<floatX> w;
        point_layer(&w, m->params + o->layer0 + l * o->layer_n, o);
        LayerActivations la = layer_activations(m, l);
        norm_forward(m, la.ln1, la.ln1_mean, la.ln1_rstd, la.residual, w.ln1w, w.ln1b, BT);
        matmul_forward(la.qkv, la.ln1, w.qkvw, w.qkvb, NULL, BT, C, QKV);
        if (llama) rope_rotate(la.qkv, m->rope_cos, m->rope_sin, B, T, m->heads, 1.0f);
        attention_forward(la.atty, la.lse, la.qkv, B, T, m->heads);
        matmul_forward(la.residual2, la.atty, w.attprojw, w.attprojb, la.residual, BT, C, C);
        norm_forward(m, la.ln2, la.ln2_mean, la.ln2_rstd, la.residual2, w.ln2w, w.ln2b, BT);
        matmul_forward(la.fch, la.ln2, w.fcw, w.fcb, NULL, BT, C, F2);
        mlp_activation_forward(m, la.fch_act, la.fch, BT);
        matmul_forward(la.residual3, la.fch_act, w.fcprojw, w.fcprojb, la.residual2, BT, F, C);
    }
    const floatX* lnfw = m->params + o->lnf;
    norm_forward(m, a->lnf, a->lnf_mean, a->lnf_rstd, layer_activations(m, L - 1).residual3, lnfw, llama ? NULL : lnfw + C, BT);
    matmul_forward(a->logits, a->lnf, m->params + o->lm_head, NULL, NULL, BT, C, Vp);
    if (!targets) return;
    classifier_forward(a->losses, a->logits_lse, a->logits, m->targets, BT, V, Vp);
    loss_accumulate(m->loss_sum, a->losses, BT);
    cudaCheck(cudaMemcpyAsync(m->loss_sum_host, m->loss_sum, sizeof(double), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaEventRecord(m->loss_copied, stream));
}

// The sum of the mean losses of the forwards since the last call, which starts a new sum.
// In a training step the gradient statistics have waited for the device already.
static double model_take_loss(Model* m) {
    event_wait(m->loss_copied, "the forward pass");
    double sum = *m->loss_sum_host;
    *m->loss_sum_host = 0.0;
    cudaCheck(cudaMemsetAsync(m->loss_sum, 0, sizeof(double), stream));
    return sum;
}

// The gradient of dloss_scale * (mean loss of the last forward, which had targets),
// accumulated (+=) into the buffers the sink gives for each region of parameters, handed
// back from the end of the flat buffer to its start: lm_head (untied), the final norm,
// layers L-1 .. 0, positions (GPT-2), and last the token embedding. A tied embedding is taken
// first, for the classifier's gradient, and handed back last.
// inputs: those of that forward, which already sorted them for the embedding's scatter.
static void model_backward(Model* m, const int* inputs, int B, int T, float dloss_scale, GradSink* sink) {
    (void)inputs;
    const ModelConfig* c = &m->config;
    const Layout* o = &m->layout;
    if (B != m->last_B || T != m->last_T) fatal("backward: batch (%d, %d) is not that of the last forward (%d, %d)", B, T, m->last_B, m->last_T);
    int L = c->num_layers, C = c->channels, F = c->ffn_hidden, V = c->vocab_size, Vp = c->padded_vocab_size, llama = c->arch == ARCH_LLAMA;
    int QKV = (int)qkv_width(c), F2 = (int)fc_width(c);
    int BT = B * T;
    Activations* a = &m->act;
    float* scratch = a->colsum;
    floatX* dres = a->dresidual;
    const floatX* lnfw = m->params + o->lnf;
    float* dhead = sink->region(sink, o->lm_head, o->wte_n); // lm_head has wte's shape
    classifier_backward(a->logits, a->logits_lse, m->targets, dloss_scale / BT, BT, V, Vp);
    matmul_backward_weight(dhead, a->logits, a->lnf, BT, C, Vp);
    matmul_backward_input(a->dln, a->logits, m->params + o->lm_head, BT, C, Vp);
    if (!c->tied) sink->done(sink, o->lm_head, o->wte_n);
    float* dlnf = sink->region(sink, o->lnf, o->lnf_n);
    cudaCheck(cudaMemsetAsync(dres, 0, (size_t)BT * C * sizeof(floatX), stream));
    norm_backward(m, dres, dlnf, llama ? NULL : dlnf + C, a->dln, layer_activations(m, L - 1).residual3, lnfw, a->lnf_mean, a->lnf_rstd, BT, scratch);
    sink->done(sink, o->lnf, o->lnf_n);
    for (int l = L - 1; l >= 0; l--) {
        size_t off = o->layer0 + l * o->layer_n;
        LayerWeights<floatX> w;
        LayerWeights<float> g;
        point_layer(&w, m->params + off, o);
        point_layer(&g, sink->region(sink, off, o->layer_n), o);
        LayerActivations la = layer_activations(m, l);
        // residual3 = residual2 + fcproj(act(fc(ln2))): dres is the gradient of residual3 and of the fcproj output
        if (m->recompute) mlp_activation_forward(m, la.fch_act, la.fch, BT);
        matmul_backward_weight(g.fcprojw, dres, la.fch_act, BT, F, C);
        if (g.fcprojb) bias_backward(g.fcprojb, dres, BT, C, scratch);
        if (llama) {
            matmul_backward_input(a->dfch_act, dres, w.fcprojw, BT, F, C);
            swiglu_backward(a->dfch, la.fch, a->dfch_act, BT, F);
        } else {
            matmul_backward_input(a->dfch, dres, w.fcprojw, BT, F, C);
            gelu_backward(a->dfch, la.fch, (size_t)BT * F);
        }
        if (m->recompute) norm_forward(m, la.ln2, la.ln2_mean, la.ln2_rstd, la.residual2, w.ln2w, w.ln2b, BT);
        matmul_backward_weight(g.fcw, a->dfch, la.ln2, BT, C, F2);
        if (g.fcb) bias_backward(g.fcb, a->dfch, BT, F2, scratch);
        matmul_backward_input(a->dln, a->dfch, w.fcw, BT, C, F2);
        norm_backward(m, dres, g.ln2w, g.ln2b, a->dln, la.residual2, w.ln2w, la.ln2_mean, la.ln2_rstd, BT, scratch);
        // residual2 = residual + attproj(attention(rope(qkv(ln1)))): dres is now the gradient of residual2
        matmul_backward_weight(g.attprojw, dres, la.atty, BT, C, C);
        if (g.attprojb) bias_backward(g.attprojb, dres, BT, C, scratch);
        matmul_backward_input(a->datty, dres, w.attprojw, BT, C, C);
        attention_backward(a->dqkv, a->att_D, a->datty, la.qkv, la.atty, la.lse, B, T, m->heads);
        if (llama) rope_rotate(a->dqkv, m->rope_cos, m->rope_sin, B, T, m->heads, -1.0f);
        if (m->recompute) norm_forward(m, la.ln1, la.ln1_mean, la.ln1_rstd, la.residual, w.ln1w, w.ln1b, BT);
        matmul_backward_weight(g.qkvw, a->dqkv, la.ln1, BT, C, QKV);
        if (g.qkvb) bias_backward(g.qkvb, a->dqkv, BT, QKV, scratch);
        matmul_backward_input(a->dln, a->dqkv, w.qkvw, BT, C, QKV);
        norm_backward(m, dres, g.ln1w, g.ln1b, a->dln, la.residual, w.ln1w, la.ln1_mean, la.ln1_rstd, BT, scratch);
        sink->done(sink, off, o->layer_n);
    }
    float* dwpe = o->wpe == NO_TENSOR ? NULL : sink->region(sink, o->wpe, o->wpe_n);
    float* dwte = c->tied ? dhead : sink->region(sink, o->wte, o->wte_n);
    encoder_backward(dwte, dwpe, dres, B, T, C, &m->buckets, m->num_buckets);
    if (dwpe) sink->done(sink, o->wpe, o->wpe_n);
    sink->done(sink, o->wte, o->wte_n);
}

// ----------------------------------------------------------------------------
// optimizer buffers: the arithmetic ZeRO (dstrain.h) does on the fp32 gradients, master
// weights and Adam moments, as kernels on the device (dstrain.h's BufferOps)

// A fixed grid, independent of the device, so the partial sums and their order are too.
#define STATS_BLOCKS 1024
#define STATS_THREADS 512

// The smallest gradient magnitude that is an overflow. FP16: the averaged, scaled weight
// gradients are fp32 here, but DeepSpeed holds them in fp16, where a magnitude of 65520 or
// more rounds to inf (65504 is fp16's largest finite value): such a step is skipped as
// DeepSpeed would skip it. Partial sums (per micro batch, per rank) are not checked.
// Other builds: inf and NaN only.
#if defined(ENABLE_FP16)
#define GRAD_OVERFLOW_AT 65520.0f
#else
#define GRAD_OVERFLOW_AT INFINITY
#endif

// partial sums of squares (STATS_BLOCKS, fp64) and counts of overflows (NaN, or a magnitude
// of GRAD_OVERFLOW_AT or more) over g (n): the global norm and the overflow check in one read
__global__ void __launch_bounds__(STATS_THREADS) grad_stats_kernel(double* partial_sumsq, int* partial_nonfinite, const float* g, size_t n) {
    double ss = 0.0;
    int bad = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = g[i];
        ss += (double)v * v;
        bad += !(fabsf(v) < GRAD_OVERFLOW_AT); // true for NaN too
    }
    ss = block_sum(ss);
    bad = block_sum(bad);
    if (threadIdx.x == 0) { partial_sumsq[blockIdx.x] = ss; partial_nonfinite[blockIdx.x] = bad; }
}

// the totals of grad_stats_kernel's partials
typedef struct { double sumsq; int nonfinite; } GradStatsTotals;

// out = the partials added in order; one block of STATS_BLOCKS threads
__global__ void __launch_bounds__(STATS_BLOCKS) grad_stats_finalize_kernel(GradStatsTotals* out, const double* partial_sumsq, const int* partial_nonfinite) {
    double ss = block_sum(partial_sumsq[threadIdx.x]);
    int bad = block_sum(partial_nonfinite[threadIdx.x]);
    if (threadIdx.x == 0) { out->sumsq = ss; out->nonfinite = bad; }
}

// buffers of grad_stats: the partials, the totals, and their pinned host copy
typedef struct {
    double* partial_sumsq;  // (STATS_BLOCKS)
    int* partial_nonfinite; // (STATS_BLOCKS)
    GradStatsTotals* device;
    GradStatsTotals* host;
} GradStats;

static void grad_stats_init(GradStats* s) {
    cudaCheck(cudaMalloc(&s->partial_sumsq, STATS_BLOCKS * sizeof(double)));
    cudaCheck(cudaMalloc(&s->partial_nonfinite, STATS_BLOCKS * sizeof(int)));
    cudaCheck(cudaMalloc(&s->device, sizeof(GradStatsTotals)));
    cudaCheck(cudaMallocHost(&s->host, sizeof(GradStatsTotals)));
}

// Any inf/nan in g (n), and its sum of squares, on the host (one sync: the step logic needs them).
static void grad_stats(GradStats* s, const float* g, size_t n, int* nonfinite, double* sumsq) {
    grad_stats_kernel<<<STATS_BLOCKS, STATS_THREADS, 0, stream>>>(s->partial_sumsq, s->partial_nonfinite, g, n);
    launchCheck();
    grad_stats_finalize_kernel<<<1, STATS_BLOCKS, 0, stream>>>(s->device, s->partial_sumsq, s->partial_nonfinite);
    launchCheck();
    cudaCheck(cudaMemcpyAsync(s->host, s->device, sizeof(GradStatsTotals), cudaMemcpyDeviceToHost, stream));
    stream_wait("the step's gradients");
    *nonfinite = s->host->nonfinite > 0;
    *sumsq = s->host->sumsq;
}

// AdamW with DeepSpeed's semantics (doc/deepspeed.md section 5) over n parameters, as
// host_adamw in train_gpt.c: g = grad * grad_factor (unscale and clip); adam_w_mode false
// adds L2 to g; fp32 master, m, v. (The floatX weights follow through ModelOps.set_weights.)
__global__ void adamw_kernel(float* master, float* m, float* v, const float* grads, size_t n, float grad_factor, float lr,
                             float b1, float b2, float bc1, float bc2, float eps, float wd, int decoupled) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float p = master[i];
    float g = grads[i] * grad_factor;
    if (!decoupled) g += wd * p;
    float mi = b1 * m[i] + (1.0f - b1) * g;
    float vi = b2 * v[i] + (1.0f - b2) * g * g;
    float update = (mi / bc1) / (sqrtf(vi / bc2) + eps);
    if (decoupled) update += wd * p;
    m[i] = mi;
    v[i] = vi;
    master[i] = p - lr * update;
}

static void adamw_update(float* master, float* m, float* v, const float* grads, size_t n, const StepPlan* p, const DSConfig* c) {
    float b1 = (float)c->betas[0], b2 = (float)c->betas[1];
    float bc1 = 1.0f - powf(b1, (float)p->adam_t), bc2 = 1.0f - powf(b2, (float)p->adam_t);
    adamw_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(master, m, v, grads, n, p->grad_factor, p->lr, b1, b2, bc1, bc2, (float)c->eps,
                                                     (float)c->weight_decay, c->adam_w_mode);
    launchCheck();
}

// dst (n) += scale * src
__global__ void add_scaled_kernel(float* dst, const float* src, float scale, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] += scale * src[i];
}

// dst (n) *= s
__global__ void scale_kernel(float* dst, float s, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] *= s;
}

// dst (n) = src rounded to floatX: the working weights from the fp32 master
__global__ void weights_from_master_kernel(floatX* dst, const float* src, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = to_floatX(src[i]);
}

static void weights_from_master(floatX* dst, const float* master, size_t n) {
    weights_from_master_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(dst, master, n);
    launchCheck();
}

static void* buffer_alloc(size_t bytes) {
    void* p;
    cudaCheck(cudaMalloc(&p, bytes ? bytes : 1));
    cudaCheck(cudaMemset(p, 0, bytes));
    return p;
}
static void buffer_release(void* p) { cudaCheck(cudaFree(p)); }
static void buffer_copy(float* dst, const float* src, size_t n) { cudaCheck(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream)); }
static void buffer_zero(float* dst, size_t n) { cudaCheck(cudaMemsetAsync(dst, 0, n * sizeof(float), stream)); }
static void buffer_add_scaled(float* dst, const float* src, float scale, size_t n) {
    add_scaled_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(dst, src, scale, n);
    launchCheck();
}
static void buffer_scale(float* dst, float s, size_t n) {
    scale_kernel<<<ceil_div(n, 256), 256, 0, stream>>>(dst, s, n);
    launchCheck();
}
static void buffer_stats(const float* g, size_t n, int* nonfinite, double* sumsq) {
    static GradStats s; // for the life of the process
    static int ready = 0;
    if (!ready) { grad_stats_init(&s); ready = 1; }
    grad_stats(&s, g, n, nonfinite, sumsq);
}
// host copies are complete (and the host buffer free to change) when these return
static void buffer_to_host(float* host_dst, const float* src, size_t n) {
    cudaCheck(cudaMemcpyAsync(host_dst, src, n * sizeof(float), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
}
static void buffer_from_host(float* dst, const float* host_src, size_t n) {
    cudaCheck(cudaMemcpyAsync(dst, host_src, n * sizeof(float), cudaMemcpyHostToDevice, stream));
    cudaCheck(cudaStreamSynchronize(stream));
}

static const BufferOps DEVICE_BUFFERS = {buffer_alloc, buffer_release, buffer_copy, buffer_zero, buffer_add_scaled, buffer_scale,
                                         buffer_stats, adamw_update, buffer_to_host, buffer_from_host};

// ----------------------------------------------------------------------------
// device statistics: MFU, memory and utilisation

// Peak dense throughput (TFLOP/s) per precision of this build, by device name. fp32 is the
// CUDA-core rate: the FP32 build does not use TF32. Names with "NVL" (lower clocks and
// power) and everything not listed are unknown.
typedef struct { const char* name; double fp32, fp16, bf16; } PeakFlops;
static const PeakFlops PEAK_FLOPS[] = {
    {"H100 PCIe", 51.2, 756.0, 756.0},
    {"H100", 66.9, 989.4, 989.4},   // SXM
    {"GH200", 66.9, 989.4, 989.4},
    {"H200", 66.9, 989.4, 989.4},   // SXM
    {"A100", 19.5, 312.0, 312.0},   // SXM and PCIe
};

// NAN if the device is not in the table
static double peak_tflops(const char* device_name) {
    if (strstr(device_name, "NVL")) return NAN;
    for (size_t i = 0; i < sizeof(PEAK_FLOPS) / sizeof(PEAK_FLOPS[0]); i++) {
        const PeakFlops* p = &PEAK_FLOPS[i];
        if (strstr(device_name, p->name)) return sizeof(floatX) == 4 ? p->fp32 : (strcmp(PRECISION_NAME, "fp16") == 0 ? p->fp16 : p->bf16);
    }
    return NAN;
}

// Model FLOPs per token of a training step: 6 N for the matrix products of forward (2 N)
// and backward (4 N) over the N parameters that take part in one: all but the embeddings
// that are only looked up (GPT-2's positions, and the token embedding when lm_head is its
// own; a tied wte counts once, for the classifier); plus 12 L T C for attention's two (T,T)
// products, forward and backward, C = NH hs, without discounting the causal mask (PaLM's
// convention; the --recompute work is not counted).
static double flops_per_token(const Model* m) {
    const ModelConfig* c = &m->config;
    double looked_up = (double)m->layout.wpe_n + (c->tied ? 0.0 : (double)m->layout.wte_n);
    return 6.0 * (m->num_params - looked_up) + 12.0 * c->num_layers * (double)m->max_T * c->channels;
}

// The GPU's utilisation from NVML (the fraction of the last sample period, 1/6 s to 1 s, in
// which a kernel ran), NAN where there is none: libnvidia-ml comes with the driver, so it
// is opened at run time and neither the build nor the run needs it. The GPU is found by
// its PCI address, which CUDA_VISIBLE_DEVICES does not renumber.
typedef struct { unsigned int gpu, memory; } NvmlUtilization; // nvml.h's nvmlUtilization_t
typedef int (*NvmlInit)(void);                                  // nvmlReturn_t: 0 is success
typedef int (*NvmlHandleByPci)(const char* pci_bus_id, void** device);
typedef int (*NvmlUtilizationRates)(void* device, NvmlUtilization* u);

static double nvml_utilisation(void) {
    static int tried = 0;
    static void* device = NULL;
    static NvmlUtilizationRates rates = NULL;
    if (!tried) {
        tried = 1;
        void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
        NvmlInit init = lib ? (NvmlInit)dlsym(lib, "nvmlInit_v2") : NULL;
        NvmlHandleByPci by_pci = lib ? (NvmlHandleByPci)dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2") : NULL;
        rates = lib ? (NvmlUtilizationRates)dlsym(lib, "nvmlDeviceGetUtilizationRates") : NULL;
        char pci[32];
        snprintf(pci, sizeof pci, "%08x:%02x:%02x.0", device_prop.pciDomainID, device_prop.pciBusID, device_prop.pciDeviceID);
        if (init == NULL || by_pci == NULL || rates == NULL || init() != 0 || by_pci(pci, &device) != 0) device = NULL;
    }
    NvmlUtilization u;
    if (device == NULL || rates(device, &u) != 0) return NAN;
    return u.gpu / 100.0;
}

// ----------------------------------------------------------------------------
// several GPUs: the ranks of the GPU trainer and the backends between them, behind
// dstrain.h's Comm: NCCL between GPUs (one per local rank), and MPI with host staging
// where several ranks share a GPU or the build has no NCCL. gpu_init_comm is
// ModelOps.init_comm.

#ifdef USE_NCCL

// NCCL backend: device buffers. Collectives run on their own stream, ordered after the
// trainer's compute stream with events, so a stage-2 bucket's reduce-scatter overlaps the
// rest of backward; wait() makes the compute stream wait for the result. NCCL needs equal
// counts for its reduce-scatter and all-gather, and partitions are uneven ranges, so a
// bucket is reduced to each owner with grouped ncclReduce calls and the weights are
// gathered with grouped ncclBroadcast calls (the same bytes on the wire).
typedef struct {
    ncclComm_t comm;
    cudaStream_t stream;
    cudaStream_t* compute; // the trainer's stream (created after the communicator)
    double* scalars;       // device scratch for host scalars
    double* host_scalars;  // pinned: copies to and from it are asynchronous, so the wait below polls
} NcclImpl;

typedef struct { cudaEvent_t done; } NcclRequest;

static void nccl_check(ncclResult_t r, const char* what, int line) {
    if (r != ncclSuccess) fatal("NCCL error in %s (train_gpt.cu:%d): %s", what, line, ncclGetErrorString(r));
}
#define ncclCheck(call, what) nccl_check(call, what, __LINE__)

static void nccl_begin(Comm* c) { // the collective sees everything the compute stream did before
    NcclImpl* n = (NcclImpl*)c->impl;
    cudaEvent_t e;
    cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    cudaEventRecord(e, *n->compute);
    cudaStreamWaitEvent(n->stream, e, 0);
    cudaEventDestroy(e);
}

static void* nccl_end(Comm* c) {
    NcclImpl* n = (NcclImpl*)c->impl;
    NcclRequest* r = (NcclRequest*)mallocCheck(sizeof(NcclRequest));
    cudaEventCreateWithFlags(&r->done, cudaEventDisableTiming);
    cudaEventRecord(r->done, n->stream);
    return r;
}

// Comm.wait: the compute stream waits for the collective; the host does not (a stage-2
// bucket is waited for inside backward). A collective that never completes is caught by
// the next bounded host wait (event_wait), at the latest the step's gradient statistics.
static void nccl_wait(Comm* c, void* request, const char* what) {
    (void)what;
    NcclImpl* n = (NcclImpl*)c->impl;
    NcclRequest* r = (NcclRequest*)request;
    cudaCheck(cudaStreamWaitEvent(*n->compute, r->done, 0));
    cudaCheck(cudaEventDestroy(r->done)); // released once it has happened
    free(r);
}

// the communicator the device waits may depend on, for event_wait's checks
static NcclImpl* nccl_active = NULL;
static void nccl_wait_check(const char* what) {
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(nccl_active->comm, &async);
    if (async != ncclSuccess) fatal("%s: a collective failed: %s", what, ncclGetErrorString(async));
}
static void nccl_wait_abort(void) { ncclCommAbort(nccl_active->comm); }

static void nccl_allreduce_f64(Comm* c, double* v, int count, int op_max, const char* what) {
    NcclImpl* n = (NcclImpl*)c->impl;
    if (count > COMM_MAX_SCALARS) fatal("internal: %s: %d scalars, at most %d", what, count, COMM_MAX_SCALARS);
    nccl_begin(c);
    memcpy(n->host_scalars, v, count * sizeof(double));
    cudaCheck(cudaMemcpyAsync(n->scalars, n->host_scalars, count * sizeof(double), cudaMemcpyHostToDevice, n->stream));
    ncclCheck(ncclAllReduce(n->scalars, n->scalars, count, ncclDouble, op_max ? ncclMax : ncclSum, n->comm, n->stream), what);
    cudaCheck(cudaMemcpyAsync(n->host_scalars, n->scalars, count * sizeof(double), cudaMemcpyDeviceToHost, n->stream));
    NcclRequest* r = (NcclRequest*)nccl_end(c);
    event_wait(r->done, what); // the host needs the result: polled, bounded by the timeout
    nccl_wait(c, r, what);
    memcpy(v, n->host_scalars, count * sizeof(double));
    c->bytes_sent += 2 * ring_bytes(c, count * 8.0);
}

static void nccl_allreduce_f32(Comm* c, float* buf, size_t count, const char* what) {
    NcclImpl* n = (NcclImpl*)c->impl;
    nccl_begin(c);
    ncclCheck(ncclAllReduce(buf, buf, count, ncclFloat, ncclSum, n->comm, n->stream), what);
    nccl_wait(c, nccl_end(c), what);
    c->bytes_sent += 2 * ring_bytes(c, count * 4.0);
}

static void* nccl_reduce_scatter_start(Comm* c, const float* send, float* recv, const size_t* counts, const char* what) {
    NcclImpl* n = (NcclImpl*)c->impl;
    nccl_begin(c);
    ncclCheck(ncclGroupStart(), what);
    size_t offset = 0;
    for (int k = 0; k < c->world_size; k++) {
        if (counts[k]) ncclCheck(ncclReduce(send + offset, recv, counts[k], ncclFloat, ncclSum, k, n->comm, n->stream), what);
        offset += counts[k];
    }
    ncclCheck(ncclGroupEnd(), what);
    c->bytes_sent += ring_bytes(c, offset * 4.0);
    return nccl_end(c);
}

static void nccl_allgather(Comm* c, void* buf, size_t elem_size, const size_t* counts, const size_t* displs, const char* what) {
    NcclImpl* n = (NcclImpl*)c->impl;
    nccl_begin(c);
    ncclCheck(ncclGroupStart(), what);
    double total = 0;
    for (int k = 0; k < c->world_size; k++) {
        char* p = (char*)buf + displs[k] * elem_size;
        if (counts[k]) ncclCheck(ncclBroadcast(p, p, counts[k] * elem_size, ncclInt8, k, n->comm, n->stream), what);
        total += counts[k] * elem_size;
    }
    ncclCheck(ncclGroupEnd(), what);
    nccl_wait(c, nccl_end(c), what);
    c->bytes_sent += ring_bytes(c, total);
}

static void nccl_barrier(Comm* c, const char* what) {
    double zero = 0;
    nccl_allreduce_f64(c, &zero, 1, 0, what);
}

static void nccl_finalize(Comm* c) {
    NcclImpl* n = (NcclImpl*)c->impl;
    device_wait_check = NULL;
    device_wait_abort = NULL;
    nccl_active = NULL;
    ncclCommDestroy(n->comm);
    cudaFree(n->scalars);
    cudaFreeHost(n->host_scalars);
    cudaStreamDestroy(n->stream);
    free(n);
}

// `id` must be the same on every rank (from ncclGetUniqueId on rank 0, shared by MPI,
// TCP or a file); the device must already be selected.
static void comm_init_nccl(Comm* c, int rank, int world, int local_rank, const ncclUniqueId* id, cudaStream_t* compute) {
    NcclImpl* n = (NcclImpl*)callocCheck(1, sizeof(NcclImpl));
    Comm m = {"nccl", rank, world, local_rank, 300.0, 0.0, n, nccl_allreduce_f64, nccl_allreduce_f32, nccl_reduce_scatter_start,
              nccl_wait, nccl_allgather, nccl_barrier, nccl_finalize};
    *c = m;
    n->compute = compute;
    cudaCheck(cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking));
    cudaCheck(cudaMalloc(&n->scalars, COMM_MAX_SCALARS * sizeof(double)));
    cudaCheck(cudaMallocHost(&n->host_scalars, COMM_MAX_SCALARS * sizeof(double)));
    ncclCheck(ncclCommInitRank(&n->comm, world, *id, rank), "ncclCommInitRank");
    nccl_active = n;
    device_wait_check = nccl_wait_check;
    device_wait_abort = nccl_wait_abort;
}
#endif

#ifdef USE_MPI
// MPI for device buffers through host copies: how several ranks share one GPU (NCCL
// refuses that), so a single-GPU machine can test sharding. Collectives are blocking.
typedef struct { cudaStream_t* compute; float* host; size_t capacity; } StagedImpl;

static float* staged_host(Comm* c, size_t bytes) {
    StagedImpl* s = (StagedImpl*)c->impl;
    if (bytes > s->capacity) {
        free(s->host);
        s->host = (float*)mallocCheck(bytes);
        s->capacity = bytes;
    }
    cudaStreamSynchronize(*s->compute); // the device data is complete
    return s->host;
}

static void staged_allreduce_f32(Comm* c, float* buf, size_t n, const char* what) {
    float* h = staged_host(c, n * sizeof(float));
    cudaMemcpy(h, buf, n * sizeof(float), cudaMemcpyDeviceToHost);
    mpi_allreduce_f32(c, h, n, what);
    cudaMemcpy(buf, h, n * sizeof(float), cudaMemcpyHostToDevice);
}

static void* staged_reduce_scatter_start(Comm* c, const float* send, float* recv, const size_t* counts, const char* what) {
    size_t total = 0;
    for (int k = 0; k < c->world_size; k++) total += counts[k];
    float* h = staged_host(c, (total + counts[c->rank]) * sizeof(float));
    cudaMemcpy(h, send, total * sizeof(float), cudaMemcpyDeviceToHost);
    mpi_wait(c, mpi_reduce_scatter_start(c, h, h + total, counts, what), what);
    cudaMemcpy(recv, h + total, counts[c->rank] * sizeof(float), cudaMemcpyHostToDevice);
    return NULL;
}

static void staged_wait(Comm* c, void* request, const char* what) { (void)c; (void)request; (void)what; }

static void staged_allgather(Comm* c, void* buf, size_t elem_size, const size_t* counts, const size_t* displs, const char* what) {
    size_t end = 0;
    for (int k = 0; k < c->world_size; k++) if (displs[k] + counts[k] > end) end = displs[k] + counts[k];
    char* h = (char*)staged_host(c, end * elem_size);
    cudaMemcpy(h, buf, end * elem_size, cudaMemcpyDeviceToHost);
    mpi_allgather(c, h, elem_size, counts, displs, what);
    cudaMemcpy(buf, h, end * elem_size, cudaMemcpyHostToDevice);
}

// Turns an MPI communicator into one for device buffers.
static void comm_stage_through_host(Comm* c, cudaStream_t* compute) {
    StagedImpl* s = (StagedImpl*)callocCheck(1, sizeof(StagedImpl));
    s->compute = compute;
    c->impl = s;
    c->backend = "mpi (device buffers staged through host memory: several ranks share a GPU)";
    c->allreduce_f32 = staged_allreduce_f32;
    c->reduce_scatter_start = staged_reduce_scatter_start;
    c->wait = staged_wait;
    c->allgather = staged_allgather;
}

#ifdef USE_NCCL
static void nccl_mpi_finalize(Comm* c) { nccl_finalize(c); MPI_Finalize(); }
#endif
#endif

#ifdef USE_NCCL
// NCCL's unique id from rank 0, for ranks that a launcher's variables describe (env): through
// DSTRAIN_NCCL_ID_FILE on a shared file system, or over TCP to MASTER_ADDR:MASTER_PORT.
static void nccl_id_from_launcher(ncclUniqueId* id, const LaunchEnv* env, double timeout_s) {
    if (env->rank == 0) ncclCheck(ncclGetUniqueId(id), "ncclGetUniqueId");
    const char* file = getenv("DSTRAIN_NCCL_ID_FILE");
    if (file) { // rank 0 writes the id atomically, the others wait for it
        char tmp[PATH_LEN];
        format_path(tmp, sizeof tmp, "%s.tmp", file);
        if (env->rank == 0) {
            FILE* f = fopenCheck(tmp, "wb");
            fwrite_check(id, sizeof *id, 1, f, tmp);
            fclose(f);
            if (rename(tmp, file) != 0) fatal("cannot rename '%s' to '%s': %s", tmp, file, strerror(errno));
        } else {
            double start = wall_seconds();
            while (file_size(file) != (long long)sizeof *id) {
                if (wall_seconds() - start > timeout_s) fatal("rank %d: DSTRAIN_NCCL_ID_FILE '%s' did not appear within %.0f s (--comm-timeout)", env->rank, file, timeout_s);
                usleep(100000);
            }
            FILE* f = fopenCheck(file, "rb");
            fread_check(id, sizeof *id, 1, f, file);
            fclose(f);
        }
        return;
    }
    const char *addr = getenv("MASTER_ADDR"), *port = getenv("MASTER_PORT");
    char err[512];
    if (!addr || !port) fatal("%s launch (rank %d of %d): set MASTER_ADDR and MASTER_PORT (or DSTRAIN_NCCL_ID_FILE) so the ranks can meet", env->source, env->rank, env->world_size);
    if (tcp_broadcast(id, sizeof *id, env->rank, env->world_size, addr, port, timeout_s, err, sizeof err)) fatal("%s", err);
}
#endif

// Ranks started by mpirun: NCCL between them where every rank has a GPU of its own and the
// build has NCCL; otherwise (ranks sharing a GPU, or no NCCL) MPI with host staging.
static void comm_init_gpu_mpi(Comm* c, int* argc, char*** argv, cudaStream_t* compute, int devices) {
#ifdef USE_MPI
    comm_init_mpi(c, argc, argv);
    int local_ranks = 0;
    MPI_Comm local;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL, &local);
    MPI_Comm_size(local, &local_ranks);
    MPI_Comm_free(&local);
    cudaCheck(cudaSetDevice(c->local_rank % devices));
    if (c->world_size == 1) return;
#ifdef USE_NCCL
    if (local_ranks <= devices) { // NCCL cannot put two ranks on one GPU
        ncclUniqueId id;
        if (c->rank == 0) ncclCheck(ncclGetUniqueId(&id), "ncclGetUniqueId");
        MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
        comm_init_nccl(c, c->rank, c->world_size, c->local_rank, &id, compute);
        c->finalize = nccl_mpi_finalize; // MPI launched the ranks: finalize it too
        return;
    }
#endif
    comm_stage_through_host(c, compute);
#else
    (void)argc; (void)argv; (void)compute; (void)devices;
    refuse_ranks(NO_MPI_BUILD ": launch it with torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR), or rebuild with MPI");
    cudaCheck(cudaSetDevice(0));
    comm_init_single(c);
#endif
}

// ModelOps.init_comm: the GPU trainer's ranks, one GPU per local rank. mpirun's ranks meet
// through MPI (comm_init_gpu_mpi); ranks that torchrun, the DeepSpeed launcher or Slurm
// describe with variables meet through NCCL, bounded by the timeout (--comm-timeout).
static void gpu_init_comm(Comm* c, int* argc, char*** argv, double timeout_s) {
    device_timeout_s = timeout_s;
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) fatal("no CUDA device found");
    if (launched_by_mpi()) { comm_init_gpu_mpi(c, argc, argv, &stream, devices); return; }
    LaunchEnv env = {0, 1, 0, NULL};
    char err[512];
    int from_env = launch_env(&env, err, sizeof err);
    if (from_env < 0) fatal("%s", err);
    if (from_env == 0 || env.world_size == 1) { cudaCheck(cudaSetDevice(0)); comm_init_single(c); return; }
    cudaCheck(cudaSetDevice(env.local_rank % devices));
#ifdef USE_NCCL
    ncclUniqueId id;
    nccl_id_from_launcher(&id, &env, timeout_s);
    comm_init_nccl(c, env.rank, env.world_size, env.local_rank, &id, &stream);
#else
    (void)timeout_s;
    fatal("%s launch (rank %d of %d): ranks started this way meet through NCCL, and this trainer was built without it (install NCCL and rebuild with make, or launch with mpirun)",
          env.source, env.rank, env.world_size);
#endif
}

// ----------------------------------------------------------------------------
// the trainer: the model behind dstrain.h's ModelOps; the training driver is train_main

static void* gpu_build(const ModelConfig* c, int B, int T, const Options* opt) {
    Model* m = (Model*)mallocCheck(sizeof(Model));
    model_build(m, c, B, T, opt->recompute);
    return m;
}
static size_t gpu_num_params(void* m) { return ((Model*)m)->num_params; }
static void* gpu_weights(void* model, size_t* elem_size) { *elem_size = sizeof(floatX); return ((Model*)model)->params; }

// the working weights [offset, offset + n) from the fp32 master (a device buffer of ZeRO's)
static void gpu_set_weights(void* model, size_t offset, const float* master, size_t n) { weights_from_master(((Model*)model)->params + offset, master, n); }

static void gpu_forward(void* m, const int* inputs, const int* targets, int B, int T) { model_forward((Model*)m, inputs, targets, B, T); }
static double gpu_take_loss(void* m) { return model_take_loss((Model*)m); }
static void gpu_backward(void* m, const int* inputs, int B, int T, float dloss_scale, GradSink* sink) { model_backward((Model*)m, inputs, B, T, dloss_scale, sink); }

// softmax of the last forward's logits at (0, position), over the V real tokens, on the host
static const float* gpu_probs(void* model, int position) {
    Model* m = (Model*)model;
    int V = m->config.vocab_size, Vp = m->config.padded_vocab_size;
    cudaCheck(cudaMemcpyAsync(m->logits_row, m->act.logits + (size_t)position * Vp, Vp * sizeof(floatX), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    float maxval = -INFINITY;
    for (int i = 0; i < V; i++) maxval = fmaxf(maxval, to_float(m->logits_row[i]));
    double sum = 0.0;
    for (int i = 0; i < V; i++) { m->probs_host[i] = expf(to_float(m->logits_row[i]) - maxval); sum += m->probs_host[i]; }
    for (int i = 0; i < V; i++) m->probs_host[i] = (float)(m->probs_host[i] / sum);
    return m->probs_host;
}

// the model's own buffers (ZeRO reports the weights, gradients, master and moments), and the device
static void gpu_describe_memory(void* model) {
    Model* m = (Model*)model;
    printf("  activations and backward scratch: %.1f MB (micro batch %d, sequence %d, --recompute %s); cuBLASLt workspace %.1f MB\n",
           m->act_bytes / 1e6, m->max_B, m->max_T, m->recompute ? "on" : "off", CUBLASLT_WORKSPACE_BYTES / 1e6);
    size_t free_b, total_b;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    printf("  device: %.2f GB in use of %.2f GB\n", (total_b - free_b) / 1e9, total_b / 1e9);
}

static void gpu_device_stats(void* model, double step_seconds, double tokens_per_step, double* mfu, double* memory_gb, double* utilisation) {
    Model* m = (Model*)model;
    static int warned = 0;
    double peak = peak_tflops(device_prop.name);
    if (isnan(peak) && !warned) {
        printf("note: MFU is unknown for %s (not in train_gpt.cu's table of peak FLOP/s)\n", device_prop.name);
        warned = 1;
    }
    *mfu = flops_per_token(m) * tokens_per_step / step_seconds / (peak * 1e12); // NAN when unknown
    size_t free_b, total_b;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    *memory_gb = (total_b - free_b) / 1e9; // the whole GPU's: ranks that share it count each other's
    *utilisation = nvml_utilisation();
}

static void gpu_synchronize(void* model) { (void)model; stream_wait("a phase of wall_clock_breakdown"); }

static void gpu_free(void* model) { model_free((Model*)model); free(model); }

// The ds_config must ask for the precision this binary was built for. Returns 0, or -1
// with the reason and the command that builds the right binary in err.
static int precision_config_check(const DSConfig* c, char* err, size_t errlen) {
    const char* build = "this trainer was built with PRECISION=" PRECISION_FLAG;
    if (c->fp16_enabled && strcmp(PRECISION_FLAG, "FP16") != 0) {
        return fail(err, errlen, "%s: fp16.enabled is true but %s: rebuild with `make train PRECISION=FP16`, or disable fp16 in the config", c->path, build);
    }
    if (c->bf16_enabled && strcmp(PRECISION_FLAG, "BF16") != 0) {
        return fail(err, errlen, "%s: bf16.enabled is true but %s: rebuild with `make train PRECISION=BF16`, or disable bf16 in the config", c->path, build);
    }
    if (!c->fp16_enabled && strcmp(PRECISION_FLAG, "FP16") == 0) {
        return fail(err, errlen, "%s: %s, which trains with DeepSpeed's fp16 loss scaling, but fp16.enabled is not true: enable fp16 in the config, "
                    "or rebuild with `make train PRECISION=BF16` (or FP32)", c->path, build);
    }
    return 0;
}

// Refuses what this trainer cannot run; says what the device and build are.
static void gpu_describe_run(const DSConfig* c, const Comm* comm) {
    char err[1024];
    if (precision_config_check(c, err, sizeof err)) fatal("%s", err);
    cuda_setup();
    int device = 0;
    cudaCheck(cudaGetDevice(&device));
    printf("rank %d of %d: GPU %d, communication: %s\n", comm->rank, comm->world_size, device, comm->backend);
    printf("device: %s (compute capability %d.%d, %d SMs, %.1f GB)\n", device_prop.name, device_prop.major, device_prop.minor,
           device_prop.multiProcessorCount, device_prop.totalGlobalMem / 1e9);
    printf("precision: %s weights and activations; fp32 master weights, Adam moments, weight gradients and matmul accumulation\n", PRECISION_NAME);
    if (!c->bf16_enabled && !c->fp16_enabled && strcmp(PRECISION_FLAG, "BF16") == 0) {
        printf("note: the config enables neither bf16 nor fp16 (DeepSpeed would train in fp32); this build computes in bf16 (rebuild with `make train PRECISION=FP32` for fp32)\n");
    }
}

// --plan: the working weights' size, and the activations, backward scratch and cuBLASLt
// workspace that model_build would allocate
static double gpu_plan_memory(const ModelConfig* c, int B, int T, const Options* opt, size_t* weight_bytes) {
    *weight_bytes = sizeof(floatX);
    return (double)activations_bytes(c, B, T, opt->recompute) + CUBLASLT_WORKSPACE_BYTES;
}

static const ModelOps GPU_OPS = {"GPU trainer (" PRECISION_NAME ", CUDA)", gpu_init_comm, gpu_describe_run, &DEVICE_BUFFERS, gpu_build,
                                 gpu_num_params, gpu_weights, gpu_set_weights, gpu_forward, gpu_take_loss, gpu_backward, gpu_probs, gpu_describe_memory, gpu_plan_memory,
                                 gpu_device_stats, gpu_synchronize, gpu_free};

#ifndef TESTING
int main(int argc, char** argv) {
    return train_main(argc, argv, &GPU_OPS);
}
#endif
