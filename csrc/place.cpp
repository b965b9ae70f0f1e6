#include "place.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pysynth {

namespace {

// Span [x0, x1) of pixel columns whose centres lie between consecutive crossings of row y.
template <typename Fn>
void scan_polygon(const double* xy, int64_t n, int64_t h, int64_t w, std::vector<double>& xs, Fn&& fill) {
  double ymin = xy[1], ymax = xy[1];
  for (int64_t k = 1; k < n; ++k) {
    ymin = std::min(ymin, xy[2 * k + 1]);
    ymax = std::max(ymax, xy[2 * k + 1]);
  }
  const int64_t row0 = std::max<int64_t>(0, static_cast<int64_t>(std::ceil(ymin - 0.5)));
  const int64_t row1 = std::min<int64_t>(h - 1, static_cast<int64_t>(std::floor(ymax - 0.5)));
  for (int64_t i = row0; i <= row1; ++i) {
    const double y = static_cast<double>(i) + 0.5;
    xs.clear();
    for (int64_t k = 0; k < n; ++k) {
      const double x0 = xy[2 * k], y0 = xy[2 * k + 1];
      const int64_t m = (k + 1 == n) ? 0 : k + 1;
      const double x1 = xy[2 * m], y1 = xy[2 * m + 1];
      // Half-open rule on y so that a vertex exactly on the row is counted once.
      if ((y0 <= y && y < y1) || (y1 <= y && y < y0)) {
        xs.push_back(x0 + (y - y0) * (x1 - x0) / (y1 - y0));
      }
    }
    std::sort(xs.begin(), xs.end());
    for (size_t p = 0; p + 1 < xs.size(); p += 2) {
      // Columns j with xs[p] <= j + 0.5 < xs[p+1].
      int64_t j0 = static_cast<int64_t>(std::ceil(xs[p] - 0.5));
      int64_t j1 = static_cast<int64_t>(std::ceil(xs[p + 1] - 0.5));
      j0 = std::max<int64_t>(j0, 0);
      j1 = std::min<int64_t>(j1, w);
      if (j1 > j0) fill(i, j0, j1);
    }
  }
}

}  // namespace

bool place_one(const double* xy, int64_t n, double max_overlap, int64_t min_area, int32_t label,
               int32_t* labels, double* stat, int64_t h, int64_t w, std::vector<double>& xs) {
  if (n < 3) return false;
  int64_t area = 0, taken = 0;
  scan_polygon(xy, n, h, w, xs, [&](int64_t i, int64_t j0, int64_t j1) {
    const int32_t* row = labels + i * w;
    area += j1 - j0;
    for (int64_t j = j0; j < j1; ++j) taken += row[j] != 0;
  });
  if (area < min_area || static_cast<double>(taken) > max_overlap * static_cast<double>(area)) return false;
  double count = 0, sx = 0, sy = 0;
  scan_polygon(xy, n, h, w, xs, [&](int64_t i, int64_t j0, int64_t j1) {
    int32_t* row = labels + i * w;
    for (int64_t j = j0; j < j1; ++j) {
      if (row[j] == 0) {
        row[j] = label;
        count += 1;
        sx += static_cast<double>(j) + 0.5;
        sy += static_cast<double>(i) + 0.5;
      }
    }
  });
  stat[0] = count;
  stat[1] = sx;
  stat[2] = sy;
  return true;
}

int64_t place_polygons(const double* xy, const int64_t* offsets, int64_t n_candidates, double max_overlap,
                       int64_t min_area, int64_t max_accept, int32_t* labels, double* stats,
                       int64_t h, int64_t w) {
  std::vector<double> xs;
  xs.reserve(64);
  int64_t accepted = 0;
  for (int64_t c = 0; c < n_candidates && accepted < max_accept; ++c) {
    const int32_t label = static_cast<int32_t>(accepted + 1);
    if (place_one(xy + 2 * offsets[c], offsets[c + 1] - offsets[c], max_overlap, min_area, label, labels,
                  stats + 3 * accepted, h, w, xs)) {
      ++accepted;
    }
  }
  return accepted;
}

}  // namespace pysynth
