#include <chrono>
#include <cstring>

#include "kernels.h"
#include "test.h"
#include "tinyvllm.h"

namespace tvtest {
int g_failures = 0;
int g_total_checks = 0;
}  // namespace tvtest

// Usage: tinyvllm_tests [substring]   (runs the tests whose name contains it)
int main(int argc, char **argv) {
    int failed_tests = 0, ran = 0;
    // The default path (TINYVLLM_KERNEL or the best detected): cross/run-tests.sh checks this line.
    std::string avail;
    for (const char *name : tv::available_kernels()) avail += std::string(avail.empty() ? "" : ",") + name;
    std::printf("kernel path: %s (available: %s)\n", tv_kernel_path(), avail.c_str());
    for (auto &[name, fn] : tvtest::Registry::get().tests) {
        if (argc > 1 && name.find(argv[1]) == std::string::npos) continue;
        tvtest::g_failures = 0;
        const auto t0 = std::chrono::steady_clock::now();
        fn();
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        ran++;
        if (tvtest::g_failures) failed_tests++;
        std::printf("[%s] %s (%.0f ms)%s\n", tvtest::g_failures ? "FAIL" : " ok ", name.c_str(), ms,
                    tvtest::g_failures ? (" " + std::to_string(tvtest::g_failures) + " failed checks").c_str() : "");
    }
    std::printf("%d tests, %d failed, %d checks\n", ran, failed_tests, tvtest::g_total_checks);
    return failed_tests ? 1 : 0;
}
