/*
test.h: the smallest test harness. A test is a function; it passes if none of its
CHECKs fail. Each program ends with "N passed, N failed" and exits non-zero on failure.
*/
#ifndef TEST_H
#define TEST_H
#include <stdio.h>
#include <string.h>
#include "compare.h"

static int test_failed_checks, tests_passed, tests_failed;

#define CHECK(cond, ...) do { \
    if (!(cond)) { \
        test_failed_checks++; \
        printf("    check failed at %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        printf(__VA_ARGS__); \
        printf("\n"); \
    } \
} while (0)

// err contains the substring `want`
#define CHECK_ERR(rc, err, want) CHECK((rc) != 0 && strstr(err, want) != NULL, "expected an error containing \"%s\", got rc %d: \"%s\"", want, rc, err)

// RUN(test) runs test(); RUN_WITH(test, arg) runs test(arg), for tests that share a fixture
#define RUN(test) RUN_WITH(test, )
#define RUN_WITH(test, arg) do { \
    int before = test_failed_checks; \
    test(arg); \
    if (test_failed_checks == before) { tests_passed++; printf("ok   %s\n", #test); } \
    else { tests_failed++; printf("FAIL %s\n", #test); } \
    fflush(stdout); \
} while (0)

// CHECK that n floats equal their reference bit for bit and are all finite: two runs that
// both went NaN would otherwise be identical
#define CHECK_BITWISE(a, b, n, ...) do { \
    char why_[256]; \
    TensorErr e_ = tensor_err((a), (b), (n)); \
    int finite_ = tensor_within(e_, INFINITY, why_, sizeof why_); \
    if (!finite_ || memcmp((a), (b), (n) * sizeof(float)) != 0) { \
        test_failed_checks++; \
        printf("    check failed at %s:%d: ", __FILE__, __LINE__); \
        printf(__VA_ARGS__); \
        if (finite_) printf(": not bit for bit (rel err %.3e)\n", e_.rel_err); else printf(": %s\n", why_); \
    } \
} while (0)

static int test_summary(void) {
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}

// CHECK that a tensor comparison (a TensorErr from compare.h) is finite everywhere and within
// tol; the printf-style arguments name the tensor, the failure says why and where
#define CHECK_TENSOR(err, tol, ...) do { \
    char why_[256]; \
    if (!tensor_within((err), (tol), why_, sizeof why_)) { \
        test_failed_checks++; \
        printf("    check failed at %s:%d: ", __FILE__, __LINE__); \
        printf(__VA_ARGS__); \
        printf(": %s\n", why_); \
    } \
} while (0)
#endif
