// Push-pull inpainting with fine-scale texture transplanted from elsewhere in the image.
#pragma once

#include <cstdint>

namespace pysynth {

// Fills the pixels of image (h, w, 3) where mask != 0 and writes the result to out (known pixels
// unchanged). Pull: halve by 2x2 sums of weight and weight * colour, weight = min(1, sum), until a
// level has no empty pixel. Push, coarse to fine: F = W * C + (1 - W) * (U + texture * D) with U
// the bilinear 2x upsample of the coarser F; on the finest `texture_levels` levels D = C(q) - U(q)
// at q = p + offset / 2^level for the first of the offsets (dy, dx pairs, multiples of
// 2^(texture_levels - 1)) whose q is inside and fully known, else D = 0. Needs at least one known
// pixel.
void inpaint_push_pull(const uint8_t* image, const uint8_t* mask, int64_t h, int64_t w,
                       const int32_t* offsets_yx, int64_t n_offsets, int64_t texture_levels,
                       float texture, uint8_t* out);

}  // namespace pysynth
