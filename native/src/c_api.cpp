// The error half of the C ABI (c_api.h): the thread-local last error, the mapping of exceptions
// to tv_status codes, and tv::fail, the thrower every validation goes through.
#include "c_api.h"

#include <cstdarg>
#include <cstdio>
#include <new>
#include <string>

#include "common.h"

namespace tv {

namespace {

thread_local std::string t_error;

void set_error(const char *msg) noexcept {
    try {
        t_error = msg;
    } catch (...) {
        t_error.clear();  // could not even store the message; the return code still says it all
    }
}

}  // namespace

void fail(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    throw InvalidArgument(buf);
}

void clear_last_error() noexcept { t_error.clear(); }

int status_of_current_exception() noexcept {
    try {
        throw;
    } catch (const InvalidArgument &e) {
        set_error(e.what());
        return TV_ERR_INVALID;
    } catch (const std::bad_alloc &) {
        set_error("out of memory");
        return TV_ERR_NOMEM;
    } catch (const std::exception &e) {
        try {
            set_error((std::string("internal error: ") + e.what()).c_str());
        } catch (...) {
            set_error("internal error");
        }
        return TV_ERR_INTERNAL;
    } catch (...) {
        set_error("internal error: unknown exception");
        return TV_ERR_INTERNAL;
    }
}

}  // namespace tv

extern "C" const char *tv_last_error(void) { return tv::t_error.c_str(); }
