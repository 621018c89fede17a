/*
test.h: the smallest test harness. A test is a function; it passes if none of its
CHECKs fail. Each program ends with "N passed, N failed" and exits non-zero on failure.
*/
#ifndef TEST_H
#define TEST_H
#include <stdio.h>
#include <string.h>

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

#define RUN(test) do { \
    int before = test_failed_checks; \
    test(); \
    if (test_failed_checks == before) { tests_passed++; printf("ok   %s\n", #test); } \
    else { tests_failed++; printf("FAIL %s\n", #test); } \
    fflush(stdout); \
} while (0)

static int test_summary(void) {
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed ? 1 : 0;
}

// relative error |a - b| / max(|b|, floor)
static double rel_err(double a, double b, double floor_) {
    double d = a > b ? a - b : b - a, m = b < 0 ? -b : b;
    return d / (m > floor_ ? m : floor_);
}
#endif
