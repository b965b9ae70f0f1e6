// Placing polygon nuclei one after another into an instance label map, refusing those that overlap
// the ones already placed by more than a fraction of their own area.
#pragma once

#include <cstdint>

namespace pysynth {

// Pixel (i, j) belongs to a polygon when its centre (j + 0.5, i + 0.5) is inside (even-odd rule).
// Candidates are tried in order; candidate k has vertices xy[2*offsets[k] .. 2*offsets[k+1]) as x, y pairs.
// An accepted candidate gets the next label (1, 2, ...) on the pixels it covers that are still 0; one is
// refused when it covers fewer than min_area pixels or when more than max_overlap of its pixels are taken.
// Stops after max_accept acceptances. For each accepted label l (1-based), stats[3*(l-1) + {0,1,2}] receive
// its final pixel count and the sums of its pixel-centre x and y. Returns the number accepted.
// labels (h*w int32) must be all zero on entry; scratch must hold h*w bytes.
int64_t place_polygons(const double* xy, const int64_t* offsets, int64_t n_candidates, double max_overlap,
                       int64_t min_area, int64_t max_accept, int32_t* labels, double* stats,
                       int64_t h, int64_t w);

}  // namespace pysynth
