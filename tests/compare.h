/*
compare.h: how every C and CUDA test measures a result against its reference.

A comparison that is false for NaN skips the bad value: `if (d > max_diff)` never takes a
NaN, so a tensor made entirely of NaN would have relative error 0 and pass. Each measure
here therefore looks for NaN and inf first, in the result and in the reference, and a
tensor holding one fails whatever the tolerance, with the first such element named.

Plain C, static inline functions only: test.h, reference.h, dev/cuda/common.h and
dev/cpu/matmul.c include it.
*/
#ifndef COMPARE_H
#define COMPARE_H
#include <math.h>
#include <stdio.h>
#include <stddef.h>

// |a - b| / max(|b|, floor); infinite when either value is NaN or inf, so that no
// `rel_err(...) <= tol` can pass on a non-finite value
static inline double rel_err(double a, double b, double floor_) {
    if (!isfinite(a) || !isfinite(b)) return INFINITY;
    double d = fabs(a - b), m = fabs(b);
    return d / (m > floor_ ? m : floor_);
}

typedef struct {
    double rel_err;     // max |a - b| / max |b| over the finite elements (max |a - b| where b is all zero)
    long long first_bad; // index (row * cols + column) of the first NaN or inf in a or b; -1 if none
    size_t cols;        // row length, to name the row and column of first_bad
    double bad_a, bad_b; // the values at first_bad
} TensorErr;

// compares rows x cols elements of a with the reference b, each row at its own stride (logits
// skip their padding columns)
static inline TensorErr tensor_err_strided(const float* a, const float* b, size_t rows, size_t cols, size_t a_stride, size_t b_stride) {
    TensorErr e = {0.0, -1, cols, 0.0, 0.0};
    double max_diff = 0.0, max_ref = 0.0;
    for (size_t r = 0; r < rows; r++) {
        for (size_t i = 0; i < cols; i++) {
            double x = a[r * a_stride + i], y = b[r * b_stride + i];
            if (!isfinite(x) || !isfinite(y)) {
                if (e.first_bad < 0) { e.first_bad = (long long)(r * cols + i); e.bad_a = x; e.bad_b = y; }
                continue;
            }
            max_diff = fmax(max_diff, fabs(x - y));
            max_ref = fmax(max_ref, fabs(y));
        }
    }
    e.rel_err = e.first_bad >= 0 ? INFINITY : max_ref > 0 ? max_diff / max_ref : max_diff;
    return e;
}

static inline TensorErr tensor_err(const float* a, const float* b, size_t n) { return tensor_err_strided(a, b, 1, n, 0, 0); }

// true when every element is finite and the relative error is at most tol (a NaN tolerance
// passes nothing); `why` gets the verdict in words either way
static inline int tensor_within(TensorErr e, double tol, char* why, size_t why_size) {
    if (e.first_bad >= 0) {
        const char* kind = isnan(e.bad_a) || isnan(e.bad_b) ? "NaN" : "inf";
        const char* where = isfinite(e.bad_a) ? "in the reference" : "in the result";
        snprintf(why, why_size, "%s %s at element %lld (row %lld, column %lld): %g, reference %g", kind, where, e.first_bad,
                 e.first_bad / (long long)e.cols, e.first_bad % (long long)e.cols, e.bad_a, e.bad_b);
        return 0;
    }
    int ok = e.rel_err <= tol;
    snprintf(why, why_size, "rel err %.3e %s tolerance %.3e", e.rel_err, ok ? "<=" : ">", tol);
    return ok;
}
#endif
