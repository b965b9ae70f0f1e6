#include "contours.hpp"

#include <cstddef>

namespace pysynth {

void trace_contours(const int32_t* labels, int64_t h, int64_t w, int32_t n_labels,
                    std::vector<int32_t>& xy, std::vector<int64_t>& offsets) {
  // First pixel of each label in raster order.
  std::vector<int64_t> first(static_cast<size_t>(n_labels) + 1, -1);
  for (int64_t p = 0; p < h * w; ++p) {
    const int32_t l = labels[p];
    if (l > 0 && l <= n_labels && first[l] < 0) first[l] = p;
  }
  // Directions: 0 right (+x), 1 down (+y), 2 left (-x), 3 up (-y).
  static const int step_x[4] = {1, 0, -1, 0};
  static const int step_y[4] = {0, 1, 0, -1};
  // Pixels ahead-left and ahead-right of corner (x, y) when moving in each direction, as (dx, dy).
  static const int left_dx[4] = {0, 0, -1, -1}, left_dy[4] = {-1, 0, 0, -1};
  static const int right_dx[4] = {0, -1, -1, 0}, right_dy[4] = {0, 0, -1, -1};
  offsets.clear();
  xy.clear();
  for (int32_t l = 1; l <= n_labels; ++l) {
    offsets.push_back(static_cast<int64_t>(xy.size() / 2));
    if (first[l] < 0) continue;
    auto inside = [&](int64_t x, int64_t y) {
      return x >= 0 && x < w && y >= 0 && y < h && labels[y * w + x] == l;
    };
    // The first pixel's top-left corner: the boundary arrives there going up and leaves going
    // right.
    const int64_t x0 = first[l] % w, y0 = first[l] / w;
    int64_t x = x0, y = y0;
    int d = 3;
    do {
      int next = d;
      if (!inside(x + right_dx[d], y + right_dy[d])) {
        next = (d + 1) & 3;  // the region ends ahead: turn right
      } else if (inside(x + left_dx[d], y + left_dy[d])) {
        next = (d + 3) & 3;  // the region goes on to the left: turn left
      }
      if (next != d) {
        xy.push_back(static_cast<int32_t>(x));
        xy.push_back(static_cast<int32_t>(y));
      }
      d = next;
      x += step_x[d];
      y += step_y[d];
    } while (!(x == x0 && y == y0 && d == 3));
  }
  offsets.push_back(static_cast<int64_t>(xy.size() / 2));
}

}  // namespace pysynth
