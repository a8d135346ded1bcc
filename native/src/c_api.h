// The C ABI's one error convention. Every exported function that can fail (api.cpp: models,
// caches, kernels; block_manager.cpp: the block manager) runs its body in guard(): an exception
// becomes a negative tv_status plus a thread-local message for tv_last_error(), success clears
// that message, and no C++ exception ever crosses into the caller.
#pragma once

#include <type_traits>

#include "tinyvllm.h"

namespace tv {

// The exception in flight as a tv_status (InvalidArgument: TV_ERR_INVALID, bad_alloc: TV_ERR_NOMEM,
// anything else: TV_ERR_INTERNAL), its message stored as the thread's last error. Call only
// inside a catch block.
int status_of_current_exception() noexcept;
void clear_last_error() noexcept;

// Runs f. On success: TV_OK when f returns void, else f's own (non-negative) int result.
template <class F>
int guard(F &&f) noexcept {
    try {
        int rc = TV_OK;
        if constexpr (std::is_void_v<std::invoke_result_t<F>>) f();
        else rc = f();
        clear_last_error();
        return rc;
    } catch (...) {
        return status_of_current_exception();
    }
}

}  // namespace tv
