#include "upsample.hpp"

#include <algorithm>
#include <functional>
#include <thread>
#include <vector>

namespace pysynth {

namespace {

// Source index pair and the weight of the second one for output index o of a 2x upsampling of n.
inline void source(int64_t o, int64_t n, int64_t& i0, int64_t& i1, float& lambda) {
  // (o + 0.5) / 2 - 0.5 = o / 2 - 0.25, clamped at 0: o = 0 -> 0; odd o = 2k + 1 -> k + 0.25;
  // even o = 2k > 0 -> k - 0.75 + 0.5 = (k - 1) + 0.75.
  if (o == 0) {
    i0 = 0;
    lambda = 0.0f;
  } else if (o % 2 == 1) {
    i0 = o / 2;
    lambda = 0.25f;
  } else {
    i0 = o / 2 - 1;
    lambda = 0.75f;
  }
  i1 = std::min(i0 + 1, n - 1);
}

struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
  explicit Taps(int64_t n) : i0(2 * n), i1(2 * n), w0(2 * n), w1(2 * n) {
    for (int64_t o = 0; o < 2 * n; ++o) {
      float lambda;
      source(o, n, i0[o], i1[o], lambda);
      w0[o] = 1.0f - lambda;
      w1[o] = lambda;
    }
  }
};

// Row r of low upsampled horizontally: (2w, c1).
void horizontal(const float* row, int64_t w, int64_t c1, const Taps& tx, float* __restrict out) {
  for (int64_t x = 0; x < 2 * w; ++x) {
    const float w0 = tx.w0[x], w1 = tx.w1[x];
    const float* a = row + tx.i0[x] * c1;
    const float* b = row + tx.i1[x] * c1;
    float* o = out + x * c1;
    for (int64_t k = 0; k < c1; ++k) o[k] = w0 * a[k] + w1 * b[k];
  }
}

void rows(const float* low, int64_t h, int64_t w, int64_t c1, const float* skip, int64_t c2,
          float* out, int64_t y_begin, int64_t y_end, const Taps& ty, const Taps& tx) {
  (void)h;
  const int64_t W = 2 * w, c = c1 + c2;
  // Two horizontally upsampled low rows, kept while consecutive output rows reuse them.
  std::vector<float> buffer(static_cast<size_t>(2 * W * c1));
  float* slot[2] = {buffer.data(), buffer.data() + W * c1};
  int64_t held[2] = {-1, -1};
  auto upsampled = [&](int64_t r) -> const float* {
    for (int i = 0; i < 2; ++i) {
      if (held[i] == r) return slot[i];
    }
    // Rows are asked for in increasing order, so the slot holding the smaller row is the one done with.
    const int i = held[0] < held[1] ? 0 : 1;
    horizontal(low + r * w * c1, w, c1, tx, slot[i]);
    held[i] = r;
    return slot[i];
  };
  for (int64_t y = y_begin; y < y_end; ++y) {
    const float hy0 = ty.w0[y], hy1 = ty.w1[y];
    const float* u0 = upsampled(ty.i0[y]);
    const float* u1 = upsampled(ty.i1[y]);
    float* o = out + y * W * c;
    const float* s = skip + y * W * c2;
    for (int64_t x = 0; x < W; ++x) {
      const float* a = u0 + x * c1;
      const float* b = u1 + x * c1;
      float* __restrict op = o + x * c;
      for (int64_t k = 0; k < c1; ++k) op[k] = hy0 * a[k] + hy1 * b[k];
      const float* sp = s + x * c2;
      for (int64_t k = 0; k < c2; ++k) op[c1 + k] = sp[k];
    }
  }
}

}  // namespace

void upsample2x_concat(const float* low, int64_t h, int64_t w, int64_t c1, const float* skip,
                       int64_t c2, float* out, int threads) {
  const int64_t H = 2 * h;
  const Taps ty(h), tx(w);
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, H));
  if (n == 1) {
    rows(low, h, w, c1, skip, c2, out, 0, H, ty, tx);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n - 1));
  const int64_t step = (H + n - 1) / n;
  for (int64_t t = 1; t < n; ++t) {
    const int64_t a = std::min(H, t * step), b = std::min(H, (t + 1) * step);
    pool.emplace_back(rows, low, h, w, c1, skip, c2, out, a, b, std::cref(ty), std::cref(tx));
  }
  rows(low, h, w, c1, skip, c2, out, 0, std::min(H, step), ty, tx);
  for (auto& th : pool) th.join();
}

}  // namespace pysynth
