// Marker-controlled watershed (priority flood) on a 2-D elevation map, restricted to a mask.
#pragma once

#include <cstdint>

namespace pysynth {

// Floods from the marker pixels (labels > 0 in `labels` on entry) in order of increasing elevation,
// ties broken by the order pixels were reached (first come, first served, as scikit-image does).
// A pixel takes the label of the neighbour that reached it first; pixels outside the mask (mask ==
// 0) are never labelled. connectivity 4 or 8. labels (h*w int32) is updated in place.
void watershed(const float* elevation, const uint8_t* mask, int32_t* labels, int64_t h, int64_t w,
               int connectivity);

}  // namespace pysynth
