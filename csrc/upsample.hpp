// The U-Net decoder's "upsample the coarser level 2x, then concatenate the skip" and the encoder's
// 2x2 max pooling, each in one pass over channels-last (h, w, c) buffers.
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

// out (H/2, W/2, c) = max over each 2x2 block of in (H, W, c), H and W even, with no indices.
// Exact (a maximum of stored values); NaNs are not propagated as PyTorch's pooling does.
void max_pool2x2(const float* in, int64_t H, int64_t W, int64_t c, float* out, int threads);
void max_pool2x2_bf16(const uint16_t* in, int64_t H, int64_t W, int64_t c, uint16_t* out,
                      int threads);

}  // namespace pysynth
