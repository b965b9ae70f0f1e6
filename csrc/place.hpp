// Placing polygon nuclei one after another into an instance label map, refusing those that overlap
// the ones already placed by more than a fraction of their own area.
#pragma once

#include <cstdint>

namespace pysynth {

// Pixel (i, j) belongs to a polygon when its centre (j + 0.5, i + 0.5) is inside (even-odd rule).
// A polygon is refused when it covers fewer than min_area pixels or when more than max_overlap of
// its pixels are already labelled; an accepted one writes `label` on its pixels that are still 0
// and stores its final pixel count and the sums of its pixel-centre x and y in stat[0..2].
bool place_one(const double* xy, int64_t n, double max_overlap, int64_t min_area, int32_t label,
               int32_t* labels, double* stat, int64_t h, int64_t w);

// Candidates are tried in order; candidate k has vertices xy[2*offsets[k] .. 2*offsets[k+1]) as x,
// y pairs; accepted ones are labelled 1, 2, ... Stops after max_accept acceptances. For each
// accepted label l (1-based), stats[3*(l-1) + {0,1,2}] receive what place_one stores. Returns the
// number accepted. labels (h*w int32) must be all zero on entry.
int64_t place_polygons(const double* xy, const int64_t* offsets, int64_t n_candidates,
                       double max_overlap, int64_t min_area, int64_t max_accept, int32_t* labels,
                       double* stats, int64_t h, int64_t w);

}  // namespace pysynth
