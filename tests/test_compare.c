/*
test_compare.c: the comparison helpers every C and CUDA test relies on (tests/compare.h,
CHECK_TENSOR and CHECK_BITWISE in tests/test.h) must fail on a tensor with one NaN, one
inf, or nothing but NaN, in the result or in the reference, and pass equal tensors and
tensors within tolerance. dev/cuda/common.h's check_strided is tensor_within with a print.
*/
#include <math.h>
#include <stdlib.h>
#include "test.h"

#define N 8
static const float ref[N] = {0.5f, -1.0f, 2.0f, 0.25f, -4.0f, 1.5f, 3.0f, -0.75f};

// a copy of ref with element i set to v (i < 0: no change), or all elements v (i == N)
static float* with(int i, float v) {
    static float x[N];
    memcpy(x, ref, sizeof x);
    if (i == N) for (int k = 0; k < N; k++) x[k] = v;
    else if (i >= 0) x[i] = v;
    return x;
}

// whether a CHECK_* statement fails, without counting it against this program
static int expected_failures;
#define FAILS(stmt) ({ int before_ = test_failed_checks; stmt; int failed_ = test_failed_checks > before_; \
                       expected_failures += failed_; test_failed_checks = before_; failed_; })

static int within(const float* a, const float* b, double tol) {
    char why[256];
    return tensor_within(tensor_err(a, b, N), tol, why, sizeof why);
}

static void test_rel_err_fails_on_nan_and_inf(void) {
    CHECK(rel_err(1.0, 1.0, 0) == 0.0 && rel_err(1.01, 1.0, 0) <= 0.02, "finite values");
    CHECK(!(rel_err(NAN, 1.0, 0) <= 1e-5), "NaN result");
    CHECK(!(rel_err(INFINITY, 1.0, 0) <= 1e-5), "inf result");
    CHECK(!(rel_err(1.0, NAN, 0) <= 1e-5) && !(rel_err(1.0, -INFINITY, 0) <= 1e-5), "non-finite reference");
    CHECK(!(rel_err(NAN, NAN, 0) <= 1e-5) && !(rel_err(INFINITY, INFINITY, 0) <= 1e-5), "both the same non-finite value");
}

static void test_tensor_within_passes_equal_and_close(void) {
    CHECK(within(ref, ref, 0.0), "equal tensors at tolerance 0");
    CHECK(within(with(2, 2.0f + 1e-5f), ref, 1e-5), "one element off by 1e-5 / max |ref| 4 = 2.5e-6 <= 1e-5");
    CHECK(!within(with(2, 2.5f), ref, 1e-5), "one element off by 0.5 / 4 = 0.125 > 1e-5");
    CHECK(!within(ref, ref, NAN), "a NaN tolerance passes nothing");
}

static void test_tensor_within_fails_on_nan_and_inf(void) {
    char why[256];
    float got[N];
    struct { int index; float value; const char* kind; } cases[] = {{5, NAN, "NaN"}, {0, INFINITY, "inf"}, {7, -INFINITY, "inf"}, {N, NAN, "NaN"}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        memcpy(got, with(cases[c].index, cases[c].value), sizeof got);
        int first = cases[c].index == N ? 0 : cases[c].index;
        char where[64];
        snprintf(where, sizeof where, "at element %d ", first);
        TensorErr e = tensor_err(got, ref, N);
        CHECK(!tensor_within(e, INFINITY, why, sizeof why) && strstr(why, cases[c].kind) && strstr(why, "in the result") && strstr(why, where),
              "case %zu: %s", c, why);
        e = tensor_err(ref, got, N); // the same value in the reference
        CHECK(!tensor_within(e, INFINITY, why, sizeof why) && strstr(why, "in the reference") && strstr(why, where), "case %zu, reference: %s", c, why);
    }
}

// logits compare rows at strides that skip padding: a NaN in the padding is not compared,
// a NaN in a compared column is found and named by row and column
static void test_strided_names_row_and_column(void) {
    float a[2 * 4] = {1, 2, 3, NAN, 4, 5, 6, NAN}, b[2 * 3] = {1, 2, 3, 4, 5, 6};
    char why[256];
    CHECK(tensor_within(tensor_err_strided(a, b, 2, 3, 4, 3), 0.0, why, sizeof why), "padding is not compared: %s", why);
    a[5] = NAN;
    CHECK(!tensor_within(tensor_err_strided(a, b, 2, 3, 4, 3), 1.0, why, sizeof why) && strstr(why, "element 4 (row 1, column 1)"), "%s", why);
}

static void test_check_macros_fail_on_nan_and_inf(void) {
    float x[N];
    memcpy(x, ref, sizeof x);
    printf("    (the helpers under test print the failures they are expected to report)\n");
    CHECK(!FAILS(CHECK_TENSOR(tensor_err(x, ref, N), 0.0, "equal")), "CHECK_TENSOR passes equal tensors");
    CHECK(!FAILS(CHECK_BITWISE(x, ref, N, "equal")), "CHECK_BITWISE passes equal tensors");
    CHECK(FAILS(CHECK_TENSOR(tensor_err(with(3, NAN), ref, N), 1e30, "one NaN")), "CHECK_TENSOR, one NaN");
    CHECK(FAILS(CHECK_TENSOR(tensor_err(with(3, INFINITY), ref, N), 1e30, "one inf")), "CHECK_TENSOR, one inf");
    CHECK(FAILS(CHECK_TENSOR(tensor_err(with(N, NAN), ref, N), 1e30, "all NaN")), "CHECK_TENSOR, all NaN");
    CHECK(FAILS(CHECK_TENSOR(tensor_err(with(2, 3.0f), ref, N), 1e-3, "too far")), "CHECK_TENSOR, beyond tolerance");
    // bit for bit: identical non-finite values on both sides still fail
    memcpy(x, with(3, NAN), sizeof x);
    CHECK(FAILS(CHECK_BITWISE(x, x, N, "one NaN on both sides")), "CHECK_BITWISE, one NaN");
    memcpy(x, with(3, INFINITY), sizeof x);
    CHECK(FAILS(CHECK_BITWISE(x, x, N, "one inf on both sides")), "CHECK_BITWISE, one inf");
    memcpy(x, with(N, NAN), sizeof x);
    CHECK(FAILS(CHECK_BITWISE(x, x, N, "all NaN on both sides")), "CHECK_BITWISE, all NaN");
    CHECK(FAILS(CHECK_BITWISE(with(1, -1.0000001f), ref, N, "one ulp")), "CHECK_BITWISE, one ulp off");
    CHECK(expected_failures == 8, "%d expected failures", expected_failures);
}

int main(void) {
    RUN(test_rel_err_fails_on_nan_and_inf);
    RUN(test_tensor_within_passes_equal_and_close);
    RUN(test_tensor_within_fails_on_nan_and_inf);
    RUN(test_strided_names_row_and_column);
    RUN(test_check_macros_fail_on_nan_and_inf);
    return test_summary();
}
