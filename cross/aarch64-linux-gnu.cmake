# Cross-compile for 64-bit ARM Linux with Debian's aarch64-linux-gnu toolchain:
#   cmake -S . -B build-aarch64 -G Ninja --toolchain cross/aarch64-linux-gnu.cmake
# ctest then runs the test binary through qemu-user (see CMAKE_CROSSCOMPILING_EMULATOR).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Debian puts the target's headers and libraries under /usr/aarch64-linux-gnu (not a full
# sysroot, so no CMAKE_SYSROOT): search there for libraries/headers/packages, never for programs.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# -L: where qemu finds the aarch64 dynamic loader and libc; without it no dynamic binary starts.
set(CMAKE_CROSSCOMPILING_EMULATOR "qemu-aarch64;-L;/usr/aarch64-linux-gnu")
