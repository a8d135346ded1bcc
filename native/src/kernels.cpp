// Picks the kernel table once: TINYVLLM_KERNEL if set (and usable), else the best for this CPU.
#include "kernels.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace tv {
namespace {

std::atomic<const Kernels *> g_active{nullptr};

const Kernels *lookup(const char *name) {
    if (std::strcmp(name, "scalar") == 0) return &kernels_scalar;
    if (std::strcmp(name, "avx2") == 0) return cpu_has_avx2() ? kernels_avx2_table() : nullptr;
    if (std::strcmp(name, "avx512vnni") == 0) return cpu_has_avx512vnni() ? kernels_avx512_table() : nullptr;
    if (std::strcmp(name, "avx512amx") == 0) return cpu_has_amx() ? kernels_amx_table() : nullptr;
    if (std::strcmp(name, "neon") == 0) return kernels_neon_table();
    if (std::strcmp(name, "neon_dotprod") == 0) return kernels_neon_dotprod_table();
    if (std::strcmp(name, "auto") == 0 || name[0] == '\0') {
        if (const Kernels *k = kernels_neon_dotprod_table()) return k;  // both nullptr off aarch64
        if (const Kernels *k = kernels_neon_table()) return k;
        if (cpu_has_amx() && kernels_amx_table()) return kernels_amx_table();
        if (cpu_has_avx512vnni() && kernels_avx512_table()) return kernels_avx512_table();
        return cpu_has_avx2() && kernels_avx2_table() ? kernels_avx2_table() : &kernels_scalar;
    }
    return nullptr;
}

}  // namespace

const Kernels &kernels() {
    const Kernels *k = g_active.load(std::memory_order_acquire);
    if (!k) {
        const char *env = std::getenv("TINYVLLM_KERNEL");
        k = env ? lookup(env) : nullptr;
        if (!k) k = lookup("auto");  // an unknown or unsupported request falls back, never crashes
        g_active.store(k, std::memory_order_release);
    }
    return *k;
}

std::vector<const char *> available_kernels() {
    std::vector<const char *> out;
    for (const char *name : {"scalar", "avx2", "avx512vnni", "avx512amx", "neon", "neon_dotprod"})
        if (lookup(name)) out.push_back(name);
    return out;
}

bool select_kernels(const char *name) {
    const Kernels *k = name ? lookup(name) : nullptr;
    if (!k) return false;
    g_active.store(k, std::memory_order_release);
    return true;
}

}  // namespace tv
