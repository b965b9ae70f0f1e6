#include "place.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "scanline.hpp"

namespace pysynth {

bool place_one(const double* xy, int64_t n, double max_overlap, int64_t min_area, int32_t label,
               int32_t* labels, double* stat, int64_t h, int64_t w) {
  struct Span {
    int64_t row, c0, c1;
  };
  thread_local Scanner<double> scanner;
  thread_local std::vector<Span> spans;
  spans.clear();
  scanner.scan(xy, n, 1.0, h, w,
               [&](int64_t row, int64_t c0, int64_t c1) { spans.push_back({row, c0, c1}); });
  int64_t area = 0, taken = 0;
  for (const Span& s : spans) {
    const int32_t* row = labels + s.row * w;
    area += s.c1 - s.c0;
    for (int64_t j = s.c0; j < s.c1; ++j) taken += row[j] != 0;
  }
  if (area < min_area || static_cast<double>(taken) > max_overlap * static_cast<double>(area))
    return false;
  double pixels = 0, sx = 0, sy = 0;
  for (const Span& s : spans) {
    int32_t* row = labels + s.row * w;
    for (int64_t j = s.c0; j < s.c1; ++j) {
      if (row[j] == 0) {
        row[j] = label;
        pixels += 1;
        sx += static_cast<double>(j) + 0.5;
        sy += static_cast<double>(s.row) + 0.5;
      }
    }
  }
  stat[0] = pixels;
  stat[1] = sx;
  stat[2] = sy;
  return true;
}

int64_t place_polygons(const double* xy, const int64_t* offsets, int64_t n_candidates,
                       double max_overlap, int64_t min_area, int64_t max_accept, int32_t* labels,
                       double* stats, int64_t h, int64_t w) {
  int64_t accepted = 0;
  for (int64_t c = 0; c < n_candidates && accepted < max_accept; ++c) {
    const int32_t label = static_cast<int32_t>(accepted + 1);
    if (place_one(xy + 2 * offsets[c], offsets[c + 1] - offsets[c], max_overlap, min_area, label,
                  labels, stats + 3 * accepted, h, w)) {
      ++accepted;
    }
  }
  return accepted;
}

}  // namespace pysynth
