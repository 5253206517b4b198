// ms_targets: the targets as the loss kernels take them, converted and checked on the device so
// that the host reads back at most one value per forward (the first invalid row) and nothing in
// the backward:
//   out[i] = t_i for t_i in [0, C), MS_TARGET_IGNORED for t_i = ignore_index, else
//            MS_TARGET_INVALID (and the row counts as invalid);
//   first_invalid[0] = the smallest invalid row, or rows when there is none;
//   upstream[0] = 1/sum_{rows not ignored} w_{t_i} for the mean (0 when that sum is 0), else 1;
//   the sum in f64 whatever A (f32 weights of a class many rows target overflow an f32 sum).
// One block of MS_TARGETS_BLOCK threads: each thread takes a fixed set of rows and the block
// combines them in a fixed order, so the sum, hence every bit of the gradient, is reproducible.
// The class weights (C, accumulation type) are read only with has_weights and mean.
#include "common.cuh"

template <typename I, typename A>
__device__ void convert_targets(const I* __restrict__ raw, long long rows, long long classes,
                                long long ignore_index, int has_ignore,
                                const A* __restrict__ weights, int has_weights, int mean,
                                int* __restrict__ out, long long* __restrict__ first_invalid,
                                A* __restrict__ upstream) {
    __shared__ double sums[MS_TARGETS_BLOCK];
    __shared__ long long firsts[MS_TARGETS_BLOCK];
    require_block<MS_TARGETS_BLOCK>();
    double sum = 0.0;
    long long first = rows;
    for (long long i = threadIdx.x; i < rows; i += MS_TARGETS_BLOCK) {
        const long long t = (long long)raw[i];
        int converted;
        if (has_ignore && t == ignore_index) {
            converted = MS_TARGET_IGNORED;
        } else if (t < 0 || t >= classes) {
            converted = MS_TARGET_INVALID;
            if (i < first) first = i;
        } else {
            converted = (int)t;
            if (mean) sum += has_weights ? (double)weights[t] : 1.0;
        }
        out[i] = converted;
    }
    sums[threadIdx.x] = sum;
    firsts[threadIdx.x] = first;
    __syncthreads();
    for (int half = MS_TARGETS_BLOCK / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) {
            sums[threadIdx.x] += sums[threadIdx.x + half];
            const long long other = firsts[threadIdx.x + half];
            if (other < firsts[threadIdx.x]) firsts[threadIdx.x] = other;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        first_invalid[0] = firsts[0];
        const double total = sums[0];
        upstream[0] = !mean ? A(1) : (total != 0.0 ? A(1.0 / total) : A(0));
    }
}

#define MS_TARGETS_ENTRY(I, ISUFFIX, A, ASUFFIX)                                                 \
    extern "C" __global__ void __launch_bounds__(MS_TARGETS_BLOCK)                               \
        ms_targets_##ISUFFIX##_##ASUFFIX(const I* raw, long long rows, long long classes,        \
                                         long long ignore_index, int has_ignore,                 \
                                         const A* weights, int has_weights, int mean, int* out,  \
                                         long long* first_invalid, A* upstream) {                \
        convert_targets<I, A>(raw, rows, classes, ignore_index, has_ignore, weights,             \
                              has_weights, mean, out, first_invalid, upstream);                  \
    }

MS_TARGETS_ENTRY(unsigned char, u8, float, f32)
MS_TARGETS_ENTRY(unsigned int, u32, float, f32)
MS_TARGETS_ENTRY(long long, i64, float, f32)
MS_TARGETS_ENTRY(unsigned char, u8, double, f64)
MS_TARGETS_ENTRY(unsigned int, u32, double, f64)
MS_TARGETS_ENTRY(long long, i64, double, f64)
