#include "labels.hpp"

#include <algorithm>

namespace pysynth {

void label_moments(const int32_t* labels, int64_t h, int64_t w, int64_t n, int64_t* count,
                   double* sum_y, double* sum_x, int64_t* first) {
  std::fill(count, count + n + 1, 0);
  std::fill(sum_y, sum_y + n + 1, 0.0);
  std::fill(sum_x, sum_x + n + 1, 0.0);
  std::fill(first, first + n + 1, h * w);
  for (int64_t y = 0; y < h; ++y) {
    const int32_t* row = labels + y * w;
    for (int64_t x = 0; x < w; ++x) {
      const int32_t k = row[x];
      if (k <= 0 || k > n) continue;
      if (count[k]++ == 0) first[k] = y * w + x;
      sum_y[k] += static_cast<double>(y);
      sum_x[k] += static_cast<double>(x);
    }
  }
}

void label_reduce(const int32_t* labels, const float* values, int64_t size, int64_t n,
                  int64_t* count, double* sum, double* max) {
  std::fill(count, count + n + 1, 0);
  if (sum) std::fill(sum, sum + n + 1, 0.0);
  if (max) std::fill(max, max + n + 1, 0.0);
  for (int64_t p = 0; p < size; ++p) {
    const int32_t k = labels[p];
    if (k <= 0 || k > n) continue;
    ++count[k];
    const double v = values[p];
    if (sum) sum[k] += v;
    if (max && v > max[k]) max[k] = v;
  }
}

}  // namespace pysynth
