// A tiny test harness: TEST(name) { ... CHECK(cond) << ...; } registered at static-init time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace tvtest {

struct Registry {
    std::vector<std::pair<std::string, std::function<void()>>> tests;
    static Registry &get() {
        static Registry r;
        return r;
    }
};
extern int g_failures;      // failed checks in the current test
extern int g_total_checks;  // all checks run

struct Reg {
    Reg(const char *name, std::function<void()> fn) { Registry::get().tests.emplace_back(name, std::move(fn)); }
};

// Collects an optional message after a failed check and prints it with the location.
struct Failure {
    std::ostringstream msg;
    const char *file;
    int line;
    const char *expr;
    Failure(const char *f, int l, const char *e) : file(f), line(l), expr(e) {}
    ~Failure() {
        g_failures++;
        if (g_failures <= 20) std::fprintf(stderr, "  FAIL %s:%d: %s %s\n", file, line, expr, msg.str().c_str());
    }
    template <class T>
    Failure &operator<<(const T &v) {
        msg << v;
        return *this;
    }
};

inline std::mt19937_64 &rng() {
    static std::mt19937_64 r(12345);
    return r;
}
inline float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng()); }
inline int randint(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng()); }  // inclusive

}  // namespace tvtest

#define TV_CAT2(a, b) a##b
#define TV_CAT(a, b) TV_CAT2(a, b)
#define TEST(name)                                                 \
    static void name();                                            \
    static tvtest::Reg TV_CAT(reg_, name)(#name, name);            \
    static void name()

#define CHECK(cond) \
    if (++tvtest::g_total_checks, (cond)) {} else tvtest::Failure(__FILE__, __LINE__, #cond)
#define CHECK_NEAR(a, b, tol)                                                                              \
    if (++tvtest::g_total_checks, std::fabs((double)(a) - (double)(b)) <= (double)(tol)) {} else           \
        tvtest::Failure(__FILE__, __LINE__, #a " ~= " #b) << "(" << (double)(a) << " vs " << (double)(b)  \
                                                          << ", tol " << (double)(tol) << ") "
