// Internal helpers shared by every native source file: the error type the C ABI turns into
// TV_ERR_INVALID (c_api.h), and a printf-style thrower so validation reads as one line per rule.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace tv {

// Bad caller input (shape, index, null pointer).
struct InvalidArgument : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// a * b without silent wrap-around (sizes come from the caller, so they may be absurd).
inline size_t checked_mul(size_t a, size_t b, const char *what) {
    size_t r;
    if (__builtin_mul_overflow(a, b, &r)) fail("%s: size overflow", what);
    return r;
}

}  // namespace tv
