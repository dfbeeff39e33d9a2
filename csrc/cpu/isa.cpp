#include "cpu/isa.h"

#include <atomic>

#include <c10/util/Exception.h>

namespace sqz {
namespace {

constexpr Isa widest_compiled() {
#if defined(__AVX512F__)
  return Isa::Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
  return Isa::Avx2;
#else
  return Isa::Scalar;
#endif
}

std::atomic<int> g_isa{static_cast<int>(widest_compiled())};

const char* name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

std::string cpu_isa() { return name(active_isa()); }

void set_cpu_isa(const std::string& isa) {
  Isa want;
  if (isa == "best") {
    want = widest_compiled();
  } else if (isa == "avx512") {
    want = Isa::Avx512;
  } else if (isa == "avx2") {
    want = Isa::Avx2;
  } else if (isa == "scalar") {
    want = Isa::Scalar;
  } else {
    TORCH_CHECK(false, "set_cpu_isa: isa must be one of 'best', 'avx512', 'avx2', 'scalar', got '",
                isa, "'");
  }
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(widest_compiled()), "set_cpu_isa: '",
              isa, "' is not compiled into this build (widest is '", name(widest_compiled()),
              "'; rebuild with SQZ_CPU_ARCH set to a -march that has it)");
  g_isa.store(static_cast<int>(want), std::memory_order_relaxed);
}

}  // namespace sqz
