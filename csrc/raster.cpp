#include "raster.hpp"

#include <algorithm>
#include <vector>

#include "scanline.hpp"

namespace pysynth {
void rasterize_labels(const float* xy, const int64_t* offsets, int64_t n_polygons,
                      const int32_t* ids, int32_t* labels, int64_t h, int64_t w) {
  Scanner<float> scanner;
  for (int64_t k = 0; k < n_polygons; ++k) {
    const int32_t id = ids[k];
    scanner.scan(xy + 2 * offsets[k], offsets[k + 1] - offsets[k], 1.0, h, w,
                 [&](int64_t r, int64_t c0, int64_t c1) {
                   std::fill(labels + r * w + c0, labels + r * w + c1, id);
                 });
  }
}

void rasterize_coverage(const float* xy, const int64_t* offsets, int64_t n_polygons,
                        float* coverage, int64_t h, int64_t w) {
  // One bit per sample: bit 4 * s + t is sample row s, sample column t of the pixel.
  std::vector<uint16_t> bits(static_cast<size_t>(h * w), 0);
  Scanner<float> scanner;
  for (int64_t k = 0; k < n_polygons; ++k) {
    scanner.scan(xy + 2 * offsets[k], offsets[k + 1] - offsets[k], 4.0, 4 * h, 4 * w,
                 [&](int64_t r, int64_t c0, int64_t c1) {
                   uint16_t* row = bits.data() + (r >> 2) * w;
                   const int shift = 4 * static_cast<int>(r & 3);
                   const int64_t j0 = c0 >> 2, j1 = (c1 - 1) >> 2;
                   const unsigned head = (0xFu << (c0 & 3)) & 0xFu;
                   const unsigned tail = (2u << ((c1 - 1) & 3)) - 1u;
                   if (j0 == j1) {
                     row[j0] |= static_cast<uint16_t>((head & tail) << shift);
                     return;
                   }
                   row[j0] |= static_cast<uint16_t>(head << shift);
                   const uint16_t full = static_cast<uint16_t>(0xFu << shift);
                   for (int64_t j = j0 + 1; j < j1; ++j) row[j] |= full;
                   row[j1] |= static_cast<uint16_t>(tail << shift);
                 });
  }
  const int64_t n = h * w;
  for (int64_t p = 0; p < n; ++p) {
    // Branch-free popcount of 16 bits (vectorises; __builtin_popcount would need -mpopcnt).
    uint32_t x = bits[p];
    x = x - ((x >> 1) & 0x5555u);
    x = (x & 0x3333u) + ((x >> 2) & 0x3333u);
    x = (x + (x >> 4)) & 0x0F0Fu;
    x = (x + (x >> 8)) & 0x1Fu;
    coverage[p] = static_cast<float>(x) * (1.0f / 16.0f);
  }
}

}  // namespace pysynth
