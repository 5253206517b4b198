// The emulator's sm_90 launches: thread-block clusters with distributed shared memory,
// cooperative launches with grid.sync(), dynamic shared memory above 48 KiB; then the errors
// around them, each in a child process (this program with the case's name) that must fail with
// the expected report.
#include "cuda_emu.h"

#include <spawn.h>
#include <sys/wait.h>

#include <string>

CUDA_EMU_DYNAMIC_SHARED(int, dyn_smem)
namespace cg = cooperative_groups;

constexpr unsigned kThreads = 64;       // per block in the exchange
constexpr unsigned kSlots = 2 + 2 * 16;  // per thread of the exchange: ranks, then 2 per block

__device__ int exchange_value(unsigned cluster, unsigned rank, unsigned t, int k) {
    return (int)((cluster * 16 + rank) * 1000 + t * 2 + k);
}
__device__ unsigned block_linear() {
    return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}

// Every block of a cluster reads the dynamic and the static shared memory of every block.
extern "C" __global__ void exchange(int* out) {
    extern __shared__ int dyn_smem[];
    __shared__ int stat[kThreads];
    const cg::cluster_group cluster = cg::this_cluster();
    const dim3 c = cluster.dim_blocks();
    const unsigned id = blockIdx.x / c.x +
                        gridDim.x / c.x * (blockIdx.y / c.y + gridDim.y / c.y * (blockIdx.z / c.z));
    const unsigned rank = cluster.block_rank(), t = threadIdx.x;
    dyn_smem[t] = exchange_value(id, rank, t, 0);
    stat[t] = exchange_value(id, rank, t, 1);
    cluster.sync();
    int* o = out + (block_linear() * kThreads + t) * kSlots;
    o[0] = (int)rank;
    o[1] = (int)cluster.thread_rank();
    for (unsigned r = 0; r < cluster.num_blocks(); ++r) {
        const unsigned u = (t + r + 1) % kThreads;  // another thread's entry
        o[2 + 2 * r] = cluster.map_shared_rank(dyn_smem, r)[u];
        o[3 + 2 * r] = cluster.map_shared_rank(stat, r)[u];
    }
    cluster.sync();  // the others may still read this block's shared memory
}

int check_exchange(dim3 grid, dim3 cluster, bool non_portable) {
    const unsigned blocks = grid.x * grid.y * grid.z, n = cluster.x * cluster.y * cluster.z;
    std::vector<int> out(blocks * kThreads * kSlots, -7);
    cuda_emu::LaunchConfig c;
    c.grid = grid;
    c.block = dim3(kThreads);
    c.cluster = cluster;
    c.dynamic_smem = 4096;
    c.non_portable_cluster = non_portable;
    cuda_emu::launch_ex(c, exchange, out.data());
    int bad = 0;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                const unsigned blk = x + grid.x * (y + grid.y * z);
                const unsigned id =
                    x / cluster.x +
                    grid.x / cluster.x * (y / cluster.y + grid.y / cluster.y * (z / cluster.z));
                const unsigned rank =
                    x % cluster.x + cluster.x * (y % cluster.y + cluster.y * (z % cluster.z));
                for (unsigned t = 0; t < kThreads; ++t) {
                    const int* o = &out[(blk * kThreads + t) * kSlots];
                    std::vector<int> want{(int)rank, (int)(rank * kThreads + t)};
                    for (unsigned r = 0; r < n; ++r) {
                        const unsigned u = (t + r + 1) % kThreads;
                        want.push_back(exchange_value(id, r, u, 0));
                        want.push_back(exchange_value(id, r, u, 1));
                    }
                    for (size_t i = 0; i < want.size(); ++i)
                        if (o[i] != want[i] && ++bad < 10)
                            printf("exchange cluster (%u,%u,%u): block %u thread %u slot %zu: got "
                                   "%d want %d\n",
                                   cluster.x, cluster.y, cluster.z, blk, t, i, o[i], want[i]);
                }
            }
    return bad;
}

// Each round, every block writes global memory, grid.sync(), reads another block's writes.
extern "C" __global__ void grid_exchange(int* a, int* out, int rounds) {
    const cg::grid_group grid = cg::this_grid();
    const unsigned n = (unsigned)grid.num_blocks(), b = (unsigned)grid.block_rank();
    const unsigned t = threadIdx.x;
    int acc = grid.is_valid() ? 0 : -1000000;
    for (int i = 0; i < rounds; ++i) {
        int* buf = a + (i & 1) * n * blockDim.x;  // two buffers: one grid.sync() per round
        buf[b * blockDim.x + t] = (int)(b * 100 + t + i * 7);
        grid.sync();
        acc += buf[(b + 1 + i) % n * blockDim.x + (blockDim.x - 1 - t)];
    }
    out[b * blockDim.x + t] = acc;
}

int check_grid_exchange(dim3 grid) {
    const unsigned n = grid.x * grid.y * grid.z, threads = 32;
    const int rounds = 5;
    std::vector<int> a(2 * n * threads), out(n * threads, -7);
    cuda_emu::LaunchConfig c;
    c.grid = grid;
    c.block = dim3(threads);
    c.cooperative = true;
    cuda_emu::launch_ex(c, grid_exchange, a.data(), out.data(), rounds);
    int bad = 0;
    for (unsigned b = 0; b < n; ++b)
        for (unsigned t = 0; t < threads; ++t) {
            int want = 0;
            for (int i = 0; i < rounds; ++i)
                want += (int)((b + 1 + i) % n * 100 + (threads - 1 - t) + i * 7);
            if (out[b * threads + t] != want && ++bad < 10)
                printf("grid exchange of %u blocks: block %u thread %u: got %d want %d\n", n, b, t,
                       out[b * threads + t], want);
        }
    return bad;
}

__device__ int big_value(unsigned i, unsigned rank) { return (int)(i * 2654435761u ^ rank); }

// All of a large dynamic shared memory, in this block, then in the next block of the cluster.
extern "C" __global__ void big_smem(unsigned* out, unsigned words) {
    extern __shared__ int dyn_smem[];
    const cg::cluster_group cluster = cg::this_cluster();
    const cg::thread_block block = cg::this_thread_block();
    const unsigned t = block.thread_rank(), n = block.num_threads();
    for (unsigned i = t; i < words; i += n) dyn_smem[i] = big_value(i, cluster.block_rank());
    block.sync();
    unsigned sum = 0;
    for (unsigned i = t; i < words; i += n) sum -= (unsigned)dyn_smem[(i + 1) % words];
    cluster.sync();
    const unsigned next_rank = (cluster.block_rank() + 1) % cluster.num_blocks();
    const int* next = cluster.map_shared_rank(dyn_smem, next_rank);
    for (unsigned i = t; i < words; i += n) sum += (unsigned)next[i];
    out[block_linear() * n + t] = sum;
    cluster.sync();
}

int check_big_smem(size_t bytes, unsigned cluster) {
    const unsigned blocks = 2 * cluster, threads = 128, words = (unsigned)(bytes / 4);
    std::vector<unsigned> out(blocks * threads, 7);
    cuda_emu::LaunchConfig c;
    c.grid = dim3(blocks);
    c.block = dim3(threads);
    c.cluster = dim3(cluster);
    c.dynamic_smem = bytes;
    c.max_dynamic_smem = bytes;
    cuda_emu::launch_ex(c, big_smem, out.data(), words);
    int bad = 0;
    for (unsigned b = 0; b < blocks; ++b)
        for (unsigned t = 0; t < threads; ++t) {
            unsigned want = 0;
            for (unsigned i = t; i < words; i += threads)
                want += (unsigned)big_value(i, (b % cluster + 1) % cluster) -
                        (unsigned)big_value((i + 1) % words, b % cluster);
            if (out[b * threads + t] != want && ++bad < 10)
                printf("big_smem %zu bytes, cluster %u: block %u thread %u: got %u want %u\n",
                       bytes, cluster, b, t, out[b * threads + t], want);
        }
    return bad;
}

// ---- the error cases, each run in a child ----
extern "C" __global__ void skip_cluster_sync(int*) {
    if (cg::this_cluster().block_rank() == 1) return;
    cg::this_cluster().sync();
}
extern "C" __global__ void mixed_barriers(int*) {
    if (threadIdx.x == 0) cg::this_cluster().sync();
    else __syncthreads();
}
// Rank 0 waits at cluster.sync() while rank 1 cannot get past a __syncthreads.
extern "C" __global__ void stuck_block(int*) {
    if (cg::this_cluster().block_rank() == 1) {
        if (threadIdx.x == 0) __syncthreads();
        return;
    }
    cg::this_cluster().sync();
}
extern "C" __global__ void plain_grid_sync(int*) { cg::this_grid().sync(); }
extern "C" __global__ void map_bad_rank(int*) {
    extern __shared__ int dyn_smem[];
    (void)cg::this_cluster().map_shared_rank(dyn_smem, 2);
}
extern "C" __global__ void map_not_shared(int* global) {
    (void)cg::this_cluster().map_shared_rank(global, 1);  // global memory
}
// Rank 1 exits while rank 0 still reads its shared memory (no second cluster.sync()).
extern "C" __global__ void read_after_exit(int* out) {
    extern __shared__ int dyn_smem[];
    const cg::cluster_group cluster = cg::this_cluster();
    dyn_smem[0] = 1234;
    cluster.sync();
    if (cluster.block_rank() == 1) return;
    volatile int* other = cluster.map_shared_rank(dyn_smem, 1);
    for (int i = 0; i < 5000 && other[0] == 1234; ++i) usleep(1000);
    usleep(20000);  // ASan poisons right after the bytes
    out[0] = other[0];
}
extern "C" __global__ void nothing(int*) {}

int run_case(const std::string& name) {
    int word = 0;
    cuda_emu::LaunchConfig c;
    c.grid = dim3(2);
    c.block = dim3(1);
    c.cluster = dim3(2);
    c.dynamic_smem = 64;
    if (name == "skip_cluster_sync") {
        cuda_emu::launch_ex(c, skip_cluster_sync, &word);
    } else if (name == "mixed_barriers") {
        c.block = dim3(64);
        cuda_emu::launch_ex(c, mixed_barriers, &word);
    } else if (name == "stuck_block") {
        c.block = dim3(64);
        cuda_emu::launch_ex(c, stuck_block, &word);
    } else if (name == "plain_grid_sync") {
        cuda_emu::launch(dim3(2), dim3(32), 0, plain_grid_sync, &word);
    } else if (name == "cluster_grid_sync") {
        cuda_emu::launch_ex(c, plain_grid_sync, &word);
    } else if (name == "smem_over_limit") {
        c.dynamic_smem = 48 * 1024 + 4;
        cuda_emu::launch_ex(c, nothing, &word);
    } else if (name == "smem_limit_over_max") {
        c.max_dynamic_smem = CUDA_EMU_MAX_DYNAMIC_SHARED + 1024;
        cuda_emu::launch_ex(c, nothing, &word);
    } else if (name == "cluster_not_dividing") {
        c.grid = dim3(6);
        c.cluster = dim3(4);
        cuda_emu::launch_ex(c, nothing, &word);
    } else if (name == "cluster_too_big") {
        c.grid = c.cluster = dim3(16);
        cuda_emu::launch_ex(c, nothing, &word);
    } else if (name == "cooperative_too_big") {
        c.grid = dim3(cuda_emu::max_cooperative_blocks + 1);
        c.cluster = dim3(1);
        c.cooperative = true;
        cuda_emu::launch_ex(c, nothing, &word);
    } else if (name == "map_bad_rank") {
        cuda_emu::launch_ex(c, map_bad_rank, &word);
    } else if (name == "map_not_shared") {
        cuda_emu::launch_ex(c, map_not_shared, &word);
    } else if (name == "read_after_exit") {
        cuda_emu::launch_ex(c, read_after_exit, &word);
        if (word == -1) fprintf(stderr, "read after the owner exited: poison bytes\n");
        return word == -1;
    } else {
        fprintf(stderr, "no case %s\n", name.c_str());
        return 0;
    }
    return 0;
}

// Runs the case in a child: it must fail, with `expect` in its output.
int expect_failure(const char* name, const char* expect) {
    int fds[2];
    if (pipe(fds)) return 1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    posix_spawn_file_actions_addclose(&fa, fds[0]);
    char exe[] = "/proc/self/exe";
    char* const argv[] = {exe, const_cast<char*>(name), nullptr};
    pid_t pid;
    if (posix_spawn(&pid, exe, &fa, nullptr, argv, environ)) return 1;
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    std::string text;
    char buf[4096];
    for (ssize_t r; (r = read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, (size_t)r);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (failed && text.find(expect) != std::string::npos) return 0;
    printf("case %s: want a failure with \"%s\", got status 0x%x and:\n%s\n", name, expect, status,
           text.c_str());
    return 1;
}

int main(int argc, char** argv) {
    if (argc > 1) return run_case(argv[1]);
    int bad = 0, checks = 0;
    const auto check = [&](int b) {
        bad += b != 0;
        ++checks;
    };
    check(check_exchange(dim3(1), dim3(1), false));  // a cluster of one block
    check(check_exchange(dim3(6), dim3(2), false));
    check(check_exchange(dim3(4, 4), dim3(2, 2), false));
    check(check_exchange(dim3(4, 2, 2), dim3(2, 2, 2), false));
    check(check_exchange(dim3(16, 2), dim3(16), true));
    check(check_grid_exchange(dim3(4, 2, 2)));
    check(check_grid_exchange(dim3(cuda_emu::max_cooperative_blocks)));
    check(check_big_smem(200 * 1024, 2));
    check(check_big_smem(CUDA_EMU_MAX_DYNAMIC_SHARED, 1));
#if defined(CUDA_EMU_ASAN)
    const char* after_exit = "use-after-poison";
#elif defined(CUDA_EMU_TSAN)
    const char* after_exit = "data race";
#else
    const char* after_exit = "poison bytes";
#endif
    const char* const cases[][2] = {
        {"skip_cluster_sync", "(a divergent cluster barrier)"},
        {"mixed_barriers", "threads of the block wait at different barriers"},
        {"stuck_block", "__syncthreads reached by 1 of the block's 64 threads"},
        {"plain_grid_sync", "grid.sync() outside a cooperative launch"},
        {"cluster_grid_sync", "grid.sync() outside a cooperative launch"},
        {"smem_over_limit", "launch with 49156 bytes of dynamic shared memory (limit 49152"},
        {"smem_limit_over_max", "above the 232448 bytes a block can have"},
        {"cluster_not_dividing", "cluster (4,1,1), which does not divide grid (6,1,1)"},
        {"cluster_too_big", "a cluster of 16 blocks: at most 8"},
        {"cooperative_too_big", "cooperative launch of 65 blocks"},
        {"map_bad_rank", "map_shared_rank to rank 2 of a cluster of 2 blocks"},
        {"map_not_shared", "which is not shared memory"},
        {"read_after_exit", after_exit},
    };
    for (const auto& c : cases) check(expect_failure(c[0], c[1]));
    printf("cluster self-test: %d passed, %d failed\n", checks - bad, bad);
    return bad != 0;
}
