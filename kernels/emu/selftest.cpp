// The shim's warp collectives against their CUDA definitions (one warp of 32 + a 2nd warp).
#include "cuda_emu.h"
extern "C" __global__ void k(int* out) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int* o = out + w * 32 * 8 + lane * 8;
    o[0] = __shfl_xor_sync(0xffffffffu, lane, 1);
    o[1] = __shfl_down_sync(0xffffffffu, lane, 3);
    o[2] = __shfl_up_sync(0xffffffffu, lane, 3);
    o[3] = __shfl_down_sync(0xffffffffu, lane, 2, 8);
    o[4] = __shfl_sync(0xffffffffu, lane, 5, 8);
    o[5] = __shfl_xor_sync(0xffffffffu, lane, 8, 8);
    o[6] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
    if (lane < 16) o[7] = __shfl_xor_sync(0x0000ffffu, lane * 10, 4); else o[7] = -1;
}
int main() {
    std::vector<int> out(64 * 8, -7);
    cuda_emu::launch(dim3(1), dim3(64), 0, k, out.data());
    int bad = 0;
    unsigned ballot = 0;
    for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
    for (int t = 0; t < 64; ++t) {
        const int l = t & 31;
        const int* o = &out[t * 8];
        const int want[8] = {l ^ 1, l + 3 <= 31 ? l + 3 : l, l >= 3 ? l - 3 : l,
                             (l % 8) + 2 < 8 ? l + 2 : l, (l / 8) * 8 + 5,
                             ((l ^ 8) <= ((l & ~7) | 7)) ? (l ^ 8) : l,  // PTX bfly: j <= maxLane
                             (int)ballot, l < 16 ? (l ^ 4) * 10 : -1};
        // xor 8, width 8: lane l reads l^8 when l^8 <= (l & ~7) | 7, i.e. when l^8 is in an
        // earlier group (the CUDA guide: "later groups ... their own value").
        for (int i = 0; i < 8; ++i)
            if (o[i] != want[i] && ++bad < 10) printf("thread %d op %d: got %d want %d\n", t, i, o[i], want[i]);
    }
    printf("%d passed, %d failed\n", 64 * 8 - bad, bad);
    return bad != 0;
}
