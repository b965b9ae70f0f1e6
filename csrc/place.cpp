#include "place.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace pysynth {

namespace {

// Crossings of each pixel-centre row y = i + 0.5 with the polygon edges, bucketed by row, for rows
// [row0, row1]; spans [x0, x1) between consecutive crossings are inside (even-odd rule).
struct Crossings {
  int64_t row0 = 0, row1 = -1;
  std::vector<int32_t> start;  // row r's crossings are xs[start[r] .. start[r+1])
  std::vector<double> xs;
};

void crossings(const double* xy, int64_t n, int64_t h, Crossings& out,
               std::vector<int32_t>& count) {
  double ymin = xy[1], ymax = xy[1];
  for (int64_t k = 1; k < n; ++k) {
    ymin = std::min(ymin, xy[2 * k + 1]);
    ymax = std::max(ymax, xy[2 * k + 1]);
  }
  out.row0 = std::max<int64_t>(0, static_cast<int64_t>(std::ceil(ymin - 0.5)));
  out.row1 = std::min<int64_t>(h - 1, static_cast<int64_t>(std::floor(ymax - 0.5)));
  const int64_t rows = out.row1 - out.row0 + 1;
  if (rows <= 0) return;
  count.assign(static_cast<size_t>(rows), 0);
  // Half-open rule on y so that a vertex exactly on a row is counted once: rows with y0 <= y < y1.
  auto edge_rows = [&](int64_t k, int64_t& r0, int64_t& r1) {
    const int64_t m = (k + 1 == n) ? 0 : k + 1;
    const double ya = std::min(xy[2 * k + 1], xy[2 * m + 1]),
                 yb = std::max(xy[2 * k + 1], xy[2 * m + 1]);
    r0 = std::max<int64_t>(out.row0, static_cast<int64_t>(std::ceil(ya - 0.5)));
    r1 = std::min<int64_t>(out.row1, static_cast<int64_t>(std::ceil(yb - 0.5)) - 1);
  };
  for (int64_t k = 0; k < n; ++k) {
    int64_t r0, r1;
    edge_rows(k, r0, r1);
    for (int64_t r = r0; r <= r1; ++r) ++count[r - out.row0];
  }
  out.start.assign(static_cast<size_t>(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) out.start[r + 1] = out.start[r] + count[r];
  out.xs.resize(static_cast<size_t>(out.start[rows]));
  for (int64_t r = 0; r < rows; ++r) count[r] = out.start[r];
  for (int64_t k = 0; k < n; ++k) {
    int64_t r0, r1;
    edge_rows(k, r0, r1);
    const int64_t m = (k + 1 == n) ? 0 : k + 1;
    const double x0 = xy[2 * k], y0 = xy[2 * k + 1], x1 = xy[2 * m], y1 = xy[2 * m + 1];
    for (int64_t r = r0; r <= r1; ++r) {
      const double y = static_cast<double>(r) + 0.5;
      out.xs[count[r - out.row0]++] = x0 + (y - y0) * (x1 - x0) / (y1 - y0);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    std::sort(out.xs.begin() + out.start[r], out.xs.begin() + out.start[r + 1]);
}

// Calls fill(i, j0, j1) for each span of pixel columns whose centres lie inside, clipped to [0, w).
template <typename Fn>
void for_spans(const Crossings& c, int64_t w, Fn&& fill) {
  for (int64_t i = c.row0; i <= c.row1; ++i) {
    const int64_t r = i - c.row0;
    for (int32_t p = c.start[r]; p + 1 < c.start[r + 1]; p += 2) {
      // Columns j with xs[p] <= j + 0.5 < xs[p+1].
      const int64_t j0 = std::max<int64_t>(static_cast<int64_t>(std::ceil(c.xs[p] - 0.5)), 0);
      const int64_t j1 = std::min<int64_t>(static_cast<int64_t>(std::ceil(c.xs[p + 1] - 0.5)), w);
      if (j1 > j0) fill(i, j0, j1);
    }
  }
}

}  // namespace

bool place_one(const double* xy, int64_t n, double max_overlap, int64_t min_area, int32_t label,
               int32_t* labels, double* stat, int64_t h, int64_t w) {
  if (n < 3) return false;
  thread_local Crossings spans;
  thread_local std::vector<int32_t> count;
  crossings(xy, n, h, spans, count);
  if (spans.row1 < spans.row0) return false;
  int64_t area = 0, taken = 0;
  for_spans(spans, w, [&](int64_t i, int64_t j0, int64_t j1) {
    const int32_t* row = labels + i * w;
    area += j1 - j0;
    for (int64_t j = j0; j < j1; ++j) taken += row[j] != 0;
  });
  if (area < min_area || static_cast<double>(taken) > max_overlap * static_cast<double>(area))
    return false;
  double pixels = 0, sx = 0, sy = 0;
  for_spans(spans, w, [&](int64_t i, int64_t j0, int64_t j1) {
    int32_t* row = labels + i * w;
    for (int64_t j = j0; j < j1; ++j) {
      if (row[j] == 0) {
        row[j] = label;
        pixels += 1;
        sx += static_cast<double>(j) + 0.5;
        sy += static_cast<double>(i) + 0.5;
      }
    }
  });
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
