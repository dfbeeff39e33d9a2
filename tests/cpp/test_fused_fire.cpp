// C++ test of sqz_kernels::fused_fire through the dispatcher, against a float64 ATen reference.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <vector>

#include "cpu/codebook_spmm.h"

namespace {

using FireFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                          const std::optional<at::Tensor>&);

at::Tensor reference(const at::Tensor& x, const at::Tensor& ws, const at::Tensor& bs,
                     const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w3,
                     const at::Tensor& b3) {
  auto d = [](const at::Tensor& t) { return t.to(at::kDouble); };
  auto s = at::relu(at::conv2d(d(x), d(ws), d(bs)));
  return at::cat({at::relu(at::conv2d(s, d(w1), d(b1))),
                  at::relu(at::conv2d(s, d(w3), d(b3), {1, 1}, {1, 1}))}, 1);
}

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Row quads (codebook kernels): found only where four aligned rows hold byte-equal gap streams.
void test_shared_quads() {
  // rows 0-3 share {2, 5}; rows 4-7 too except row 6 ({2, 6}); rows 8-11 are empty; 12-13 ragged
  std::vector<uint8_t> gaps;
  std::vector<int64_t> rs = {0};
  auto row = [&](std::vector<uint8_t> g) {
    gaps.insert(gaps.end(), g.begin(), g.end());
    rs.push_back(static_cast<int64_t>(gaps.size()));
  };
  for (int r = 0; r < 4; ++r) row({2, 5});
  for (int r = 4; r < 8; ++r) row(r == 6 ? std::vector<uint8_t>{2, 6} : std::vector<uint8_t>{2, 5});
  for (int r = 8; r < 12; ++r) row({});
  row({1});
  row({1});
  const auto q = sqz::codebook::shared_quads(gaps.data(), rs.data(), 14);
  check(q.size() == 3 && q[0] == 1 && q[1] == 0 && q[2] == 0,
        "shared_quads: one shared quad, one broken by a row, an empty quad, a ragged tail");
  const auto q3 = sqz::codebook::shared_quads(gaps.data(), rs.data(), 14, 3);
  check(q3.size() == 3 && q3[0] == 0, "shared_quads: rows shorter than min_entries are no quad");
}

}  // namespace

int main() {
  test_shared_quads();
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("sqz_kernels::fused_fire", "")
                .typed<FireFn>();
  at::manual_seed(0);
  const int64_t shapes[][7] = {{1, 64, 16, 64, 64, 13, 13}, {3, 5, 3, 5, 17, 2, 3}, {2, 17, 5, 3, 7, 1, 7}};
  for (const auto& sh : shapes) {
    const int64_t n = sh[0], c = sh[1], s = sh[2], e1 = sh[3], e3 = sh[4], h = sh[5], w = sh[6];
    for (bool cl : {false, true}) {
      auto x = at::randn({n, c, h, w});
      if (cl) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      auto ws = at::randn({s, c, 1, 1}) / std::sqrt(double(c)), bs = at::randn({s});
      auto w1 = at::randn({e1, s, 1, 1}) / std::sqrt(double(s)), b1 = at::randn({e1});
      auto w3 = at::randn({e3, s, 3, 3}) / std::sqrt(9.0 * s), b3 = at::randn({e3});
      auto y = op.call(x, ws, bs, w1, b1, w3, b3);
      auto ref = reference(x, ws, bs, w1, b1, w3, b3);
      const double err = ((y.to(at::kDouble) - ref).abs().max() / ref.abs().max()).item<double>();
      char buf[160];
      std::snprintf(buf, sizeof buf, "shape n=%ld c=%ld s=%ld e1=%ld e3=%ld %ldx%ld %s rel err %.2e",
                    (long)n, (long)c, (long)s, (long)e1, (long)e3, (long)h, (long)w,
                    cl ? "channels_last" : "nchw", err);
      check(err <= 1e-5 && !y.isnan().any().item<bool>(), buf);
    }
  }
  // A bad argument is a c10::Error naming it, not a crash.
  bool threw = false;
  try {
    op.call(at::randn({1, 4, 5, 5}), at::randn({2, 3, 1, 1}), std::nullopt, at::randn({2, 2, 1, 1}),
            std::nullopt, at::randn({2, 2, 3, 3}), std::nullopt);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("w_sq must have shape") != std::string::npos;
  }
  check(threw, "mismatched w_sq raises an error naming w_sq");
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
