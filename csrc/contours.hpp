// Outlines of instance labels as polygons along pixel edges (crack following).
#pragma once

#include <cstdint>
#include <vector>

namespace pysynth {

// For every label l in 1..n_labels present in labels (h*w int32), the outer boundary of the
// 4-connected component that contains l's first pixel in raster order, traced clockwise on screen
// (x right, y down) with the region on the right. Vertices are pixel corners (x, y), one per change
// of direction, appended to xy; offsets gets one start index per label plus a final end (a label
// that is absent gets an empty polygon).
void trace_contours(const int32_t* labels, int64_t h, int64_t w, int32_t n_labels,
                    std::vector<int32_t>& xy, std::vector<int64_t>& offsets);

}  // namespace pysynth
