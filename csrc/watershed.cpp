#include "watershed.hpp"

#include <cstddef>
#include <queue>
#include <utility>
#include <vector>

namespace pysynth {

namespace {

struct Item {  // 12 bytes: tiles stay below 2^31 pixels, and each pixel is pushed at most once
  float value;
  uint32_t age;
  int32_t index;
};

// std::priority_queue pops the largest: "greater" here means later in the flood.
struct Later {
  bool operator()(const Item& a, const Item& b) const {
    return a.value > b.value || (a.value == b.value && a.age > b.age);
  }
};

}  // namespace

void watershed(const float* elevation, const uint8_t* mask, int32_t* labels, int64_t h, int64_t w,
               int connectivity) {
  static const int di[8] = {-1, 0, 0, 1, -1, -1, 1, 1};
  static const int dj[8] = {0, -1, 1, 0, -1, 1, -1, 1};
  const int n_neighbours = connectivity == 8 ? 8 : 4;
  std::vector<Item> storage;
  storage.reserve(static_cast<size_t>(h * w / 4 + 16));
  std::priority_queue<Item, std::vector<Item>, Later> heap(Later{}, std::move(storage));
  uint32_t age = 0;
  for (int64_t p = 0; p < h * w; ++p) {
    if (labels[p] > 0) heap.push({elevation[p], age++, static_cast<int32_t>(p)});
  }
  while (!heap.empty()) {
    const Item item = heap.top();
    heap.pop();
    const int64_t i = item.index / w, j = item.index % w;
    const int32_t label = labels[item.index];
    for (int k = 0; k < n_neighbours; ++k) {
      const int64_t ni = i + di[k], nj = j + dj[k];
      if (ni < 0 || ni >= h || nj < 0 || nj >= w) continue;
      const int64_t q = ni * w + nj;
      if (labels[q] != 0 || mask[q] == 0) continue;
      labels[q] = label;
      heap.push({elevation[q], age++, static_cast<int32_t>(q)});
    }
  }
}

}  // namespace pysynth
