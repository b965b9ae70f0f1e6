#include "upsample.hpp"

#include <algorithm>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

namespace pysynth {

namespace {

// Source index pair and the weight of the second one for output index o of a 2x upsampling of n.
inline void source(int64_t o, int64_t n, int64_t& i0, int64_t& i1, float& lambda) {
  // (o + 0.5) / 2 - 0.5 = o / 2 - 0.25, clamped at 0: o = 0 -> 0; odd o = 2k + 1 -> k + 0.25;
  // even o = 2k > 0 -> k - 0.25 = (k - 1) + 0.75.
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

// Storage types: float32 as it is, bfloat16 as its upper 16 bits (rounded to nearest even on store,
// as PyTorch rounds).
inline float load(float v) { return v; }
inline float load(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void store(float v, float& out) { out = v; }
inline void store(float v, uint16_t& out) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    out = static_cast<uint16_t>((bits >> 16) | 0x40u);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  out = static_cast<uint16_t>(bits >> 16);
}

// Row r of low upsampled horizontally, in float: (2w, c1).
template <typename T>
void horizontal(const T* row, int64_t w, int64_t c1, const Taps& tx, float* __restrict out) {
  for (int64_t x = 0; x < 2 * w; ++x) {
    const float w0 = tx.w0[x], w1 = tx.w1[x];
    const T* a = row + tx.i0[x] * c1;
    const T* b = row + tx.i1[x] * c1;
    float* o = out + x * c1;
    for (int64_t k = 0; k < c1; ++k) o[k] = w0 * load(a[k]) + w1 * load(b[k]);
  }
}

template <typename T>
void rows(const T* low, int64_t w, int64_t c1, const T* skip, int64_t c2, T* out, int64_t y_begin,
          int64_t y_end, const Taps& ty, const Taps& tx) {
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
    T* o = out + y * W * c;
    const T* s = skip + y * W * c2;
    for (int64_t x = 0; x < W; ++x) {
      const float* a = u0 + x * c1;
      const float* b = u1 + x * c1;
      T* __restrict op = o + x * c;
      for (int64_t k = 0; k < c1; ++k) store(hy0 * a[k] + hy1 * b[k], op[k]);
      const T* sp = s + x * c2;
      for (int64_t k = 0; k < c2; ++k) op[c1 + k] = sp[k];
    }
  }
}

// Rows [0, H) shared among up to `threads` threads: body(y_begin, y_end).
template <typename Body>
void parallel_rows(int64_t H, int threads, const Body& body) {
  const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, H));
  const int64_t step = (H + n - 1) / n;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(n - 1));
  for (int64_t t = 1; t < n; ++t) {
    const int64_t a = std::min(H, t * step), b = std::min(H, (t + 1) * step);
    pool.emplace_back([&body, a, b] { body(a, b); });
  }
  body(0, std::min(H, step));
  for (auto& th : pool) th.join();
}

template <typename T>
void run(const T* low, int64_t h, int64_t w, int64_t c1, const T* skip, int64_t c2, T* out,
         int threads) {
  const Taps ty(h), tx(w);
  parallel_rows(2 * h, threads,
                [&](int64_t a, int64_t b) { rows<T>(low, w, c1, skip, c2, out, a, b, ty, tx); });
}

template <typename T>
void pool_rows(const T* in, int64_t W, int64_t c, T* out, int64_t y_begin, int64_t y_end) {
  const int64_t w = W / 2;
  for (int64_t y = y_begin; y < y_end; ++y) {
    const T* r0 = in + (2 * y) * W * c;
    const T* r1 = r0 + W * c;
    T* o = out + y * w * c;
    for (int64_t x = 0; x < w; ++x) {
      const T* a = r0 + 2 * x * c;
      const T* b = r1 + 2 * x * c;
      T* op = o + x * c;
      for (int64_t k = 0; k < c; ++k) {
        const float m =
            std::max(std::max(load(a[k]), load(a[c + k])), std::max(load(b[k]), load(b[c + k])));
        store(m, op[k]);  // exact: a stored value
      }
    }
  }
}

}  // namespace

void upsample2x_concat(const float* low, int64_t h, int64_t w, int64_t c1, const float* skip,
                       int64_t c2, float* out, int threads) {
  run(low, h, w, c1, skip, c2, out, threads);
}

void upsample2x_concat_bf16(const uint16_t* low, int64_t h, int64_t w, int64_t c1,
                            const uint16_t* skip, int64_t c2, uint16_t* out, int threads) {
  run(low, h, w, c1, skip, c2, out, threads);
}

void max_pool2x2(const float* in, int64_t H, int64_t W, int64_t c, float* out, int threads) {
  parallel_rows(H / 2, threads, [&](int64_t a, int64_t b) { pool_rows(in, W, c, out, a, b); });
}

void max_pool2x2_bf16(const uint16_t* in, int64_t H, int64_t W, int64_t c, uint16_t* out,
                      int threads) {
  parallel_rows(H / 2, threads, [&](int64_t a, int64_t b) { pool_rows(in, W, c, out, a, b); });
}

}  // namespace pysynth
