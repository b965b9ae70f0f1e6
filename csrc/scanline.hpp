// Scanline polygon filling shared by the rasteriser and the nucleus placement: pixel (i, j) is
// inside a polygon when its centre (j + 0.5, i + 0.5) is (even-odd rule, half-open in y).
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace pysynth {

// Crossings of one polygon's edges with the scanlines y = r + 0.5 (in units scaled by `scale`),
// bucketed by row. Scratch buffers live in the struct so that drawing many polygons allocates only
// when a polygon is the largest seen so far.
template <typename T>
class Scanner {
 public:
  // Scans polygon `p` (n vertices), scaled by `scale`, against rows [0, n_rows); calls span(row,
  // c0, c1) for every run of columns c in [c0, c1), clipped to [0, n_cols), whose centres c + 0.5
  // lie inside.
  template <typename SpanFn>
  void scan(const T* p, int64_t n, double scale, int64_t n_rows, int64_t n_cols, SpanFn&& span) {
    if (n < 3) return;
    double y_lo = p[1], y_hi = p[1];
    for (int64_t v = 1; v < n; ++v) {
      y_lo = std::min(y_lo, static_cast<double>(p[2 * v + 1]));
      y_hi = std::max(y_hi, static_cast<double>(p[2 * v + 1]));
    }
    const int64_t r0 = first_row(y_lo * scale, n_rows);
    const int64_t r1 = first_row(y_hi * scale, n_rows);
    if (r0 >= r1) return;
    const int64_t rows = r1 - r0;
    start_.assign(static_cast<size_t>(rows) + 1, 0);
    // Pass 1: crossings per row; pass 2: their x positions.
    for (int pass = 0; pass < 2; ++pass) {
      if (pass == 1) {
        for (int64_t r = 0; r < rows; ++r) start_[r + 1] += start_[r];
        xs_.resize(static_cast<size_t>(start_[rows]));
        fill_.assign(start_.begin(), start_.end() - 1);
      }
      for (int64_t v = 0; v < n; ++v) {
        const int64_t u = v + 1 == n ? 0 : v + 1;
        double xa = p[2 * v] * scale, ya = p[2 * v + 1] * scale;
        double xb = p[2 * u] * scale, yb = p[2 * u + 1] * scale;
        if (ya == yb) continue;
        if (ya > yb) {
          std::swap(xa, xb);
          std::swap(ya, yb);
        }
        // Row r is crossed when its centre r + 0.5 lies in [ya, yb): half-open, so vertices count
        // once.
        const int64_t e0 = std::max(first_row(ya, n_rows), r0);
        const int64_t e1 = std::min(first_row(yb, n_rows), r1);
        if (pass == 0) {
          for (int64_t r = e0; r < e1; ++r) ++start_[r - r0 + 1];
        } else {
          const double slope = (xb - xa) / (yb - ya);
          for (int64_t r = e0; r < e1; ++r) {
            xs_[fill_[r - r0]++] = xa + (static_cast<double>(r) + 0.5 - ya) * slope;
          }
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      double* x = xs_.data() + start_[r];
      const int64_t m = start_[r + 1] - start_[r];
      // Insertion sort: a row of a nucleus polygon has 2 crossings, rarely more than 6.
      for (int64_t a = 1; a < m; ++a) {
        const double v = x[a];
        int64_t b = a;
        for (; b > 0 && x[b - 1] > v; --b) x[b] = x[b - 1];
        x[b] = v;
      }
      for (int64_t k = 0; k + 1 < m; k += 2) {
        // Columns c with c + 0.5 in [x[k], x[k + 1]).
        const int64_t c0 = first_row(x[k], n_cols);
        const int64_t c1 = first_row(x[k + 1], n_cols);
        if (c0 < c1) span(r + r0, c0, c1);
      }
    }
  }

 private:
  // The first index i in [0, n] whose centre i + 0.5 is >= t (clamped, safe for huge or tiny t).
  // (A hand-written ceil: std::ceil is a library call on baseline x86-64.)
  static int64_t first_row(double t, int64_t n) {
    const double r = t - 0.5;
    if (!(r > 0.0)) return 0;
    if (r >= static_cast<double>(n)) return n;
    const int64_t i = static_cast<int64_t>(r);
    return i + (static_cast<double>(i) < r);
  }

  std::vector<int64_t> start_;
  std::vector<int64_t> fill_;
  std::vector<double> xs_;
};

}  // namespace pysynth
