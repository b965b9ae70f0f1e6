#include "inpaint.hpp"

#include <algorithm>
#include <vector>

namespace pysynth {
namespace {

struct Level {
  int64_t h, w;
  float* c;   // colour (h, w, 3), not premultiplied; after the push, the filled colour
  float* wt;  // weight (h, w) in [0, 1]
};

// Halves `fine` into `coarse`; returns whether some coarse pixel has zero weight.
bool pull(const Level& fine, const Level& coarse) {
  bool any_empty = false;
  for (int64_t i = 0; i < coarse.h; ++i) {
    const int64_t i0 = 2 * i, i1 = std::min(2 * i + 1, fine.h - 1);
    for (int64_t j = 0; j < coarse.w; ++j) {
      const int64_t j0 = 2 * j, j1 = std::min(2 * j + 1, fine.w - 1);
      float sw = 0.0f, s0 = 0.0f, s1 = 0.0f, s2 = 0.0f;
      // An odd last row/column has one child there, not two: count it once.
      const int64_t rows[2] = {i0, i1}, cols[2] = {j0, j1};
      for (int a = 0; a < (i1 > i0 ? 2 : 1); ++a) {
        for (int b = 0; b < (j1 > j0 ? 2 : 1); ++b) {
          const int64_t p = rows[a] * fine.w + cols[b];
          const float wt = fine.wt[p];
          sw += wt;
          s0 += wt * fine.c[3 * p];
          s1 += wt * fine.c[3 * p + 1];
          s2 += wt * fine.c[3 * p + 2];
        }
      }
      const int64_t q = i * coarse.w + j;
      const float inv = sw > 0.0f ? 1.0f / sw : 0.0f;
      coarse.c[3 * q] = s0 * inv;
      coarse.c[3 * q + 1] = s1 * inv;
      coarse.c[3 * q + 2] = s2 * inv;
      coarse.wt[q] = std::min(sw, 1.0f);
      any_empty |= sw == 0.0f;
    }
  }
  return any_empty;
}

// Bilinear 2x upsample of coarse.c into up (fine.h, fine.w, 3), pixel centres aligned, borders
// replicated: fine index p sits at coarse coordinate p / 2 - 1 / 4.
void upsample(const Level& coarse, const Level& fine, float* up, std::vector<float>& row) {
  const int64_t cw = coarse.w;
  for (int64_t i = 0; i < fine.h; ++i) {
    const int64_t k = i >> 1;
    const int64_t other = std::min(std::max(i & 1 ? k + 1 : k - 1, int64_t{0}), coarse.h - 1);
    const float* near = coarse.c + 3 * k * cw;
    const float* far = coarse.c + 3 * other * cw;
    for (int64_t t = 0; t < 3 * cw; ++t) row[t] = 0.75f * near[t] + 0.25f * far[t];
    float* out = up + 3 * i * fine.w;
    for (int64_t j = 0; j < fine.w; ++j) {
      const int64_t a = j >> 1;
      const int64_t b = std::min(std::max(j & 1 ? a + 1 : a - 1, int64_t{0}), cw - 1);
      for (int ch = 0; ch < 3; ++ch)
        out[3 * j + ch] = 0.75f * row[3 * a + ch] + 0.25f * row[3 * b + ch];
    }
  }
}

}  // namespace

void inpaint_push_pull(const uint8_t* image, const uint8_t* mask, int64_t h, int64_t w,
                       const int32_t* offsets_yx, int64_t n_offsets, int64_t texture_levels,
                       float texture, uint8_t* out) {
  // One allocation holds every level's colour and weight.
  std::vector<std::pair<int64_t, int64_t>> shapes{{h, w}};
  int64_t total = h * w;
  while (shapes.back().first > 1 || shapes.back().second > 1) {
    shapes.emplace_back((shapes.back().first + 1) / 2, (shapes.back().second + 1) / 2);
    total += shapes.back().first * shapes.back().second;
  }
  std::vector<float> storage(static_cast<size_t>(4 * total));
  std::vector<Level> levels;
  float* cursor = storage.data();
  for (const auto& [lh, lw] : shapes) {
    levels.push_back({lh, lw, cursor, cursor + 3 * lh * lw});
    cursor += 4 * lh * lw;
  }

  const Level& base = levels[0];
  for (int64_t p = 0; p < h * w; ++p) {
    base.wt[p] = mask[p] ? 0.0f : 1.0f;
    for (int ch = 0; ch < 3; ++ch) base.c[3 * p + ch] = mask[p] ? 0.0f : image[3 * p + ch];
  }
  size_t top = 0;
  while (top + 1 < levels.size() && pull(levels[top], levels[top + 1])) ++top;
  if (top + 1 < levels.size())
    ++top;  // the last pull left no empty pixel: that level is the coarsest

  std::vector<float> up(static_cast<size_t>(3 * h * w));
  std::vector<float> row(static_cast<size_t>(3 * ((w + 1) / 2 + 1)));
  for (size_t l = top; l-- > 0;) {
    const Level& fine = levels[l];
    upsample(levels[l + 1], fine, up.data(), row);
    const bool textured = static_cast<int64_t>(l) < texture_levels && texture != 0.0f;
    const int64_t scale = int64_t{1} << l;
    for (int64_t i = 0; i < fine.h; ++i) {
      for (int64_t j = 0; j < fine.w; ++j) {
        const int64_t p = i * fine.w + j;
        const float wt = fine.wt[p];
        if (wt >= 1.0f) continue;  // known: F = C
        float detail[3] = {0.0f, 0.0f, 0.0f};
        if (textured) {
          for (int64_t k = 0; k < n_offsets; ++k) {
            const int64_t si = i + offsets_yx[2 * k] / scale,
                          sj = j + offsets_yx[2 * k + 1] / scale;
            if (si < 0 || si >= fine.h || sj < 0 || sj >= fine.w) continue;
            const int64_t q = si * fine.w + sj;
            if (fine.wt[q] < 1.0f) continue;
            for (int ch = 0; ch < 3; ++ch)
              detail[ch] = texture * (fine.c[3 * q + ch] - up[3 * q + ch]);
            break;
          }
        }
        for (int ch = 0; ch < 3; ++ch) {
          const float c = fine.c[3 * p + ch];
          fine.c[3 * p + ch] = wt * c + (1.0f - wt) * (up[3 * p + ch] + detail[ch]);
        }
      }
    }
  }
  for (int64_t q = 0; q < 3 * h * w; ++q) {
    const float v = std::min(std::max(base.c[q], 0.0f), 255.0f);
    out[q] = static_cast<uint8_t>(v + 0.5f);
  }
}

}  // namespace pysynth
