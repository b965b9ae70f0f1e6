// Reductions of per-pixel values over the instances of a label image, one pass each.
#pragma once

#include <cstdint>

namespace pysynth {

// For labels (h*w int32; 0 is background, and labels outside 1..n are skipped): count[k], the sums of the
// pixels' rows and columns, and first[k], the raster index of label k's first pixel (h*w where
// absent). All outputs have n + 1 entries and are overwritten.
void label_moments(const int32_t* labels, int64_t h, int64_t w, int64_t n, int64_t* count,
                   double* sum_y, double* sum_x, int64_t* first);

// count[k], sum[k] (values summed in double in raster order) and max[k] (starting at 0: for
// non-negative values such as probabilities) over label k's pixels, k in 1..n (others skipped;
// sum or max may be null). Outputs have n + 1 entries and are overwritten.
void label_reduce(const int32_t* labels, const float* values, int64_t size, int64_t n,
                  int64_t* count, double* sum, double* max);

}  // namespace pysynth
