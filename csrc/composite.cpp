#include "composite.hpp"

#include <algorithm>
#include <vector>

namespace pysynth {
namespace {

// cv2.BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), repeated for kernels wider than the image.
int64_t reflect101(int64_t i, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// Horizontal pass of a (2r + 1)-tap kernel over every row of src (h, w) into dst, from rows padded
// by `pad_r` >= r columns per side. Loops are tap-outer, column-inner so that they vectorise.
void blur_rows(const float* src, int64_t h, int64_t w, const float* k, int64_t r, int64_t pad_r,
               const std::vector<int64_t>& col_index, std::vector<float>& padded, float* dst) {
  for (int64_t i = 0; i < h; ++i) {
    const float* row = src + i * w;
    for (int64_t t = 0; t < w + 2 * pad_r; ++t) padded[t] = row[col_index[t]];
    float* out = dst + i * w;
    const float* base = padded.data() + pad_r - r;
    for (int64_t j = 0; j < w; ++j) out[j] = k[0] * base[j];
    for (int64_t t = 1; t <= 2 * r; ++t) {
      const float kt = k[t];
      const float* in = base + t;
      for (int64_t j = 0; j < w; ++j) out[j] += kt * in[j];
    }
  }
}

// Vertical pass for output row i: out[j] = sum_t k[t] * src[reflect(i + t - r), j].
void blur_column_row(const float* src, int64_t h, int64_t w, const float* k, int64_t r, int64_t i,
                     float* out) {
  const float* first = src + reflect101(i - r, h) * w;
  for (int64_t j = 0; j < w; ++j) out[j] = k[0] * first[j];
  for (int64_t t = 1; t <= 2 * r; ++t) {
    const float kt = k[t];
    const float* in = src + reflect101(i + t - r, h) * w;
    for (int64_t j = 0; j < w; ++j) out[j] += kt * in[j];
  }
}

}  // namespace

void composite(const uint8_t* fg, const uint8_t* bg, const float* mask, const float* sharpness,
               const float* k_sharp, int64_t r_sharp, const float* k_soft, int64_t r_soft,
               uint8_t* out, int64_t h, int64_t w) {
  const bool two_blurs = sharpness != nullptr;
  const int64_t pad_r = two_blurs ? std::max(r_sharp, r_soft) : r_sharp;
  std::vector<int64_t> col_index(static_cast<size_t>(w + 2 * pad_r));
  for (int64_t t = 0; t < w + 2 * pad_r; ++t) col_index[t] = reflect101(t - pad_r, w);
  std::vector<float> padded(static_cast<size_t>(w + 2 * pad_r));
  std::vector<float> rows_sharp(static_cast<size_t>(h * w));
  std::vector<float> rows_soft(two_blurs ? static_cast<size_t>(h * w) : 0);
  std::vector<float> m(static_cast<size_t>(w)), m_soft(static_cast<size_t>(w));
  std::vector<float> m3(static_cast<size_t>(3 * w));

  blur_rows(mask, h, w, k_sharp, r_sharp, pad_r, col_index, padded, rows_sharp.data());
  if (two_blurs) blur_rows(mask, h, w, k_soft, r_soft, pad_r, col_index, padded, rows_soft.data());

  for (int64_t i = 0; i < h; ++i) {
    blur_column_row(rows_sharp.data(), h, w, k_sharp, r_sharp, i, m.data());
    if (two_blurs) {
      blur_column_row(rows_soft.data(), h, w, k_soft, r_soft, i, m_soft.data());
      const float* s_row = sharpness + i * w;
      for (int64_t j = 0; j < w; ++j) {
        const float s = std::min(std::max(s_row[j], 0.0f), 1.0f);
        m[j] = m_soft[j] + s * (m[j] - m_soft[j]);
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      const float v = std::min(std::max(m[j], 0.0f), 1.0f);
      m3[3 * j] = v;
      m3[3 * j + 1] = v;
      m3[3 * j + 2] = v;
    }
    const uint8_t* a = fg + 3 * i * w;
    const uint8_t* b = bg + 3 * i * w;
    uint8_t* o = out + 3 * i * w;
    for (int64_t q = 0; q < 3 * w; ++q) {
      const float fb = b[q];
      o[q] = static_cast<uint8_t>(fb + m3[q] * (static_cast<float>(a[q]) - fb) + 0.5f);
    }
  }
}

}  // namespace pysynth
