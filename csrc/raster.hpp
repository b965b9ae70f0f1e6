// Scanline rasterisation of many small polygons into an instance label map and an anti-aliased
// coverage map.
#pragma once

#include <cstdint>

namespace pysynth {

// Paints polygon k (vertices xy[offsets[k]..offsets[k+1]) as (x, y) pairs) with ids[k] into labels
// (h, w), later polygons over earlier ones. Pixel (i, j) belongs to a polygon when its centre (j +
// 0.5, i + 0.5) is inside (even-odd rule, half-open: left/top edges in, right/bottom out). Polygons
// may extend outside the image.
void rasterize_labels(const float* xy, const int64_t* offsets, int64_t n_polygons,
                      const int32_t* ids, int32_t* labels, int64_t h, int64_t w);

// Coverage (h, w) of the union of the polygons: the fraction of a 4x4 grid of sample points per
// pixel, at (j + (t + 0.5) / 4, i + (s + 0.5) / 4), that lie inside any polygon (same inside rule
// as the labels).
void rasterize_coverage(const float* xy, const int64_t* offsets, int64_t n_polygons,
                        float* coverage, int64_t h, int64_t w);

}  // namespace pysynth
