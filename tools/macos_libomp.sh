#!/usr/bin/env bash
# Install a pinned LLVM OpenMP runtime into /tmp/libomp for macOS wheel builds
# (used by [tool.cibuildwheel.macos] in pyproject.toml).  The version is pinned
# so that every wheel vendors the same libomp, whatever Homebrew ships today.
set -euo pipefail
LIBOMP_VERSION=${LIBOMP_VERSION:-18.1.8}
prefix=/tmp/libomp
arch=$(uname -m)
platform=osx-64
[ "$arch" = arm64 ] && platform=osx-arm64
curl -Ls "https://micro.mamba.pm/api/micromamba/$platform/latest" | tar -xj -C /tmp bin/micromamba
/tmp/bin/micromamba create -y -p "$prefix" -c conda-forge "llvm-openmp==$LIBOMP_VERSION"
ls "$prefix/lib/libomp.dylib" "$prefix/include/omp.h"
