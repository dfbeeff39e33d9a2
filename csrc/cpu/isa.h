// Which SIMD instruction set the CPU kernels use. The widest one compiled into this build (set by
// -march at build time, see setup.py) is the default; tests and benchmarks may restrict it at run
// time with torch.ops.sqz_kernels.set_cpu_isa to exercise the narrower paths on the same machine.
#pragma once

#include <string>

namespace sqz {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

Isa active_isa();
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);

}  // namespace sqz
