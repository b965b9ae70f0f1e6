// The U-Net decoder's "upsample the coarser level 2x, then concatenate the skip" in one pass over
// channels-last (h, w, c) float32 buffers.
#pragma once

#include <cstdint>

namespace pysynth {

// out[y, x, :c1] = bilinear 2x upsampling of low (h, w, c1) as torch.nn.functional.interpolate
// gives it with align_corners=False (source coordinate (o + 0.5) / 2 - 0.5 clamped at 0, weights
// 0.25 / 0.75, edge rows and columns repeated); out[y, x, c1:] = skip[y, x, :] (2h, 2w, c2). All
// buffers are C-contiguous. The rows of out are shared among `threads` threads (at least 1).
void upsample2x_concat(const float* low, int64_t h, int64_t w, int64_t c1, const float* skip,
                       int64_t c2, float* out, int threads);

// The same on bfloat16 buffers (each value the upper 16 bits of a float32): computed in float32,
// stored rounded to nearest even, as PyTorch's bfloat16 interpolation does.
void upsample2x_concat_bf16(const uint16_t* low, int64_t h, int64_t w, int64_t c1,
                            const uint16_t* skip, int64_t c2, uint16_t* out, int threads);

}  // namespace pysynth
