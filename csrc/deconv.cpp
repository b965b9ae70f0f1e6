#include "deconv.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

namespace pysynth {
namespace {

// od(v) for every uint8 value, computed once in double as scikit-image does, then stored as float.
const std::array<float, 256>& optical_density_lut() {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> t{};
    const double log_adjust = std::log(1e-6);
    for (int v = 0; v < 256; ++v) {
      t[v] = static_cast<float>(std::log(std::max(v / 255.0, 1e-6)) / log_adjust);
    }
    return t;
  }();
  return lut;
}

// exp(x) for x <= 0 (x is clamped to [-87, 0]), relative error ~2e-7; branch-free so the loop
// vectorises (std::exp does not without -ffast-math).
inline float exp_nonpositive(float x) {
  x = std::min(std::max(x, -87.0f), 0.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest, |t| < 2^22
  const float y = (t - n) * 0.693147180559945309f;  // |y| <= ln(2) / 2
  float p = 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace

void rgb_to_stains(const uint8_t* rgb, int64_t n, const float* stain_from_rgb, float* out) {
  // Per channel, the density table times that channel's matrix row: a pixel is then 3 lookups of 3
  // floats.
  const std::array<float, 256>& od = optical_density_lut();
  std::array<float, 3 * 256 * 4> table;  // [channel][value][k], k padded to 4 floats
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) {
      for (int k = 0; k < 4; ++k)
        table[(c * 256 + v) * 4 + k] = k < 3 ? od[v] * stain_from_rgb[3 * c + k] : 0;
    }
  }
  const float* tr = table.data();
  const float* tg = tr + 256 * 4;
  const float* tb = tg + 256 * 4;
  for (int64_t p = 0; p < n; ++p) {
    const float* a = tr + 4 * rgb[3 * p];
    const float* b = tg + 4 * rgb[3 * p + 1];
    const float* c = tb + 4 * rgb[3 * p + 2];
    const float h = a[0] + b[0] + c[0], e = a[1] + b[1] + c[1], d = a[2] + b[2] + c[2];
    out[3 * p] = std::max(0.0f, h);
    out[3 * p + 1] = std::max(0.0f, e);
    out[3 * p + 2] = std::max(0.0f, d);
  }
}

void stains_to_rgb(const float* stains, int64_t n, const float* rgb_from_stain, uint8_t* out) {
  const float log_adjust = static_cast<float>(std::log(1e-6));
  float m[9];
  for (int k = 0; k < 9; ++k) m[k] = rgb_from_stain[k] * log_adjust;
  for (int64_t p = 0; p < n; ++p) {
    const float h = stains[3 * p], e = stains[3 * p + 1], d = stains[3 * p + 2];
    for (int c = 0; c < 3; ++c) {
      const float v = exp_nonpositive(h * m[c] + e * m[3 + c] + d * m[6 + c]);
      out[3 * p + c] = static_cast<uint8_t>(v * 255.0f + 0.5f);
    }
  }
}

}  // namespace pysynth
