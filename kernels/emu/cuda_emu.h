// cuda_emu.h: runs the source of CUDA kernels on the CPU, for tests on machines without a GPU.
//
// Include it first, then the .cu file(s), in a translation unit compiled as C++17 by g++ (tested:
// Debian's g++ 12) with -I$CUDA_HOME/include (cuda_fp16.h / cuda_bf16.h / vector_types.h from
// the nvidia-cuda-runtime / -crt / -cccl PyPI wheels work in host code), -fno-strict-aliasing
// (kernels reinterpret uint4 / T), -Wno-unknown-pragmas (#pragma unroll), and
// -DCUDA_EMU_CUDA_ARCH=900 to compile `#if __CUDA_ARCH__ >= 900` parts.
// Launch with cuda_emu::launch(grid, block, dynamic_smem_bytes, kernel, args...), or with
// cuda_emu::launch_ex(LaunchConfig, kernel, args...) for thread-block clusters, cooperative
// launches (grid.sync) and dynamic shared memory above 48 KiB.
//
// Model: the blocks of a grid run one after another (or on `workers` OS threads, block b on
// worker b % workers); the threads of a block are fibers (a small x86-64 context switch, or
// ucontext) on one OS thread, so that `thread_local` is per block: __shared__ is thread_local. A fiber runs until __syncthreads,
// a warp collective (__shfl*_sync, __syncwarp, __ballot_sync / __any_sync / __all_sync) or its
// end; the scheduler then resumes the runnable fibers in the configured order (forward, reverse
// or random: code whose result depends on the order has a race) and resolves collectives:
//  - __syncthreads: releases when every live thread waits at one; threads that exited while
//    others wait, or threads waiting at different __syncthreads (file:line) are errors;
//  - shuffles: PTX shfl.sync semantics (width, clamping); every lane named in the mask must
//    execute the same kind of collective with the same mask and width; reading a lane outside
//    the mask, a lane outside the block, or a lane that exited is an error;
//  - a block that can make no progress (divergent barrier / shuffle) is reported, not hung.
// Clusters and cooperative grids (the blocks wait on each other, so they must run at once): each
// block of a cluster (of the grid, cooperative) runs on its own OS thread with its own fibers;
// clusters run one after another. cooperative_groups' cluster.sync() / grid.sync() release when
// every live thread of every block of the group waits at one; a block that exits while others of
// its group wait, or that waits while another has exited, is an error (no timeout: the blocks
// that are done are counted). map_shared_rank is the same thread_local at the same offset from
// the TLS block of the other block's OS thread. When a block of a cluster is done its dynamic
// shared memory is poisoned (bytes, and ASan), and its OS thread waits for the whole cluster, so
// a read after the owner exited is caught rather than reading a later block's data.
// Dynamic shared memory (`extern __shared__ T name[]`) needs CUDA_EMU_DYNAMIC_SHARED(T, name)
// before the kernel source; it is filled with `poison` bytes at every block start, and with
// AddressSanitizer the bytes past the launch's dynamic size are poisoned.
// Sanitizers: ASan / UBSan (global and dynamic shared out-of-bounds, misaligned 16-byte vector
// accesses with -fsanitize=alignment, static shared arrays with -fsanitize=bounds) and TSan
// (fibers annotated: happens-before only through __syncthreads / __syncwarp, launch start and
// end, so a missing barrier on shared or global memory is a reported data race; with workers > 1
// races between blocks on different workers are reported too; cluster and grid barriers are
// happens-before edges among all the threads of their group).
// Errors print "cuda_emu: error: ..." with the block and thread, and abort.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define CUDA_EMU_TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#if __has_feature(thread_sanitizer)
#define CUDA_EMU_TSAN 1
#endif
#endif
#ifdef CUDA_EMU_ASAN
#include <sanitizer/asan_interface.h>
#endif
#ifdef CUDA_EMU_TSAN
#include <sanitizer/tsan_interface.h>
#endif

// ---- context switch: a few instructions on x86-64 (no signal-mask syscall, and nothing that
// AddressSanitizer's swapcontext interceptor would do: it wipes the target stack's shadow);
// ucontext elsewhere or with -DCUDA_EMU_UCONTEXT.
#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
#define CUDA_EMU_ASM_SWITCH 1
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save, and resumes the context whose stack pointer is `load`.
extern "C" void cuda_emu_switch_x86_64(void** save, void* load);
__asm__(".pushsection .text.cuda_emu_switch_x86_64,\"axG\",@progbits,cuda_emu_switch_x86_64,comdat\n"
        ".globl cuda_emu_switch_x86_64\n"
        ".hidden cuda_emu_switch_x86_64\n"
        ".type cuda_emu_switch_x86_64,@function\n"
        "cuda_emu_switch_x86_64:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
        "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
        "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size cuda_emu_switch_x86_64, .-cuda_emu_switch_x86_64\n"
        ".popsection\n");
#endif

// ---- CUDA keywords (cuda_fp16.h's host_defines.h already made __global__/__device__ empty) ----
#undef __shared__
#define __shared__ thread_local  // valid in `__shared__ T a[n];` and `extern __shared__ T a[];`
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifdef CUDA_EMU_CUDA_ARCH  // e.g. 800: compiles `#if __CUDA_ARCH__ >= 800` parts (bf16 entries)
#define __CUDA_ARCH__ CUDA_EMU_CUDA_ARCH
#endif
// The kernel carries its cluster shape for nvcc; the emulator takes it from the LaunchConfig.
#undef __cluster_dims__
#define __cluster_dims__(...)
#ifndef CUDA_EMU_MAX_DYNAMIC_SHARED  // sm_90's opt-in maximum per block (227 KiB)
#define CUDA_EMU_MAX_DYNAMIC_SHARED (227 * 1024)
#endif

namespace cuda_emu {

struct Options {
    enum Order { Forward, Reverse, Random } order = Forward;
    unsigned long long seed = 1;
    int poison = 0xff;       // byte filling dynamic shared memory at each block start; <0: none
    unsigned workers = 1;    // OS threads running blocks (block b on worker b % workers)
    bool strict = true;      // a __syncthreads that some threads of the block never reach: error
    size_t stack_bytes = 0;  // fiber stack; 0: 64 KiB, 256 KiB under a sanitizer
    size_t smem_limit = 48 * 1024;  // dynamic shared memory allowed by launch()
};

// A cudaLaunchKernelEx: launch_ex(config, kernel, args...).
struct LaunchConfig {
    dim3 grid, block;
    dim3 cluster = dim3(1, 1, 1);  // blocks per cluster; divides the grid in each dimension
    size_t dynamic_smem = 0;
    // The kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (CUDA_EMU_MAX_DYNAMIC_SHARED at most).
    size_t max_dynamic_smem = 48 * 1024;
    bool cooperative = false;  // cudaLaunchCooperativeKernel: grid.sync() allowed
    bool non_portable_cluster = false;  // cudaFuncAttributeNonPortableClusterSizeAllowed: 16, not 8
};
// A GPU runs a cooperative grid only if all its blocks fit on it at once; the emulator runs each
// on an OS thread, so it takes a fixed number.
constexpr unsigned max_cooperative_blocks = 64;

// CUDA_EMU_ORDER=forward|reverse|random, CUDA_EMU_SEED=n, CUDA_EMU_WORKERS=n override the defaults.
inline Options& options() {
    static Options o = [] {
        Options d;
        if (const char* s = getenv("CUDA_EMU_ORDER")) {
            if (!strcmp(s, "reverse")) d.order = Options::Reverse;
            if (!strcmp(s, "random")) d.order = Options::Random;
        }
        if (const char* s = getenv("CUDA_EMU_SEED")) d.seed = strtoull(s, nullptr, 0);
        if (const char* s = getenv("CUDA_EMU_WORKERS")) d.workers = std::max(1, atoi(s));
        return d;
    }();
    return o;
}

enum : int { S_RUN, S_BAR, S_WARP, S_GROUP, S_DONE };
enum : int { G_CLUSTER, G_GRID };  // the group of an S_GROUP wait
enum : int { W_IDX, W_UP, W_DOWN, W_XOR, W_SYNC, W_BALLOT };

// Every field that a fiber and the scheduler both touch goes through ld / st: relaxed atomics,
// which ThreadSanitizer neither reports nor takes as synchronization.
template <class T> inline T ld(const T& x) { return __atomic_load_n(&x, __ATOMIC_RELAXED); }
template <class T> inline void st(T& x, T v) { __atomic_store_n(&x, v, __ATOMIC_RELAXED); }

struct Fiber {
#ifdef CUDA_EMU_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    char* stack = nullptr;  // usable part (a guard page below it)
    size_t stack_size = 0;
    void* tsan = nullptr;
    void* asan_fake = nullptr;
    uint3 tid;
    unsigned lin = 0;
    int state = S_RUN;
    const char* file = "";  // where it waits
    int line = 0;
    int op = 0, b = 0, c = 0;  // its warp collective
    int group = G_CLUSTER;
    unsigned mask = 0;
    unsigned long long val = 0, res = 0;
};

// Every thread_local of a module sits at the same offset from this one in every OS thread.
inline thread_local char tl_anchor;

// The calling OS thread's TLS block of the module that holds tl_anchor, and so the __shared__
// variables of the kernels compiled with this header.
struct TlsBlock {
    uintptr_t begin = 0, end = 0;
};
inline TlsBlock tls_block() {
    // Once per OS thread, by its scheduler (fibers would race on the guard).
    static thread_local const TlsBlock block = [] {
        TlsBlock b;
        dl_iterate_phdr(
            [](dl_phdr_info* info, size_t, void* out) -> int {
                const uintptr_t data = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
                const uintptr_t anchor = reinterpret_cast<uintptr_t>(&tl_anchor);
                for (int i = 0; data && i < info->dlpi_phnum; ++i) {
                    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
                    if (ph.p_type == PT_TLS && anchor >= data && anchor < data + ph.p_memsz) {
                        *static_cast<TlsBlock*>(out) = TlsBlock{data, data + ph.p_memsz};
                        return 1;
                    }
                }
                return 0;
            },
            &b);
        return b;
    }();
    return block;
}

// The blocks of a cluster, or of a cooperative grid, each on its own OS thread: their barrier
// and their shared memory. The mutex orders everything here except gen, which fibers read.
struct Group {
    std::mutex m;
    std::condition_variable cv;
    bool grid = false;  // a cooperative grid (grid.sync), else a cluster (cluster.sync)
    unsigned size = 0;  // blocks
    unsigned started = 0, arrived = 0, done = 0, gen = 0;
    std::vector<char*> anchors;  // each rank's tl_anchor
    uint3 waiter{}, exited{};  // the first block waiting at the current barrier; the first done
    const char* wait_file = "";
    int wait_line = 0;
    char sync[2] = {};  // ThreadSanitizer's barrier addresses (by gen parity)
    const char* name() const { return grid ? "grid" : "cluster"; }
};

struct Worker {
    std::vector<Fiber> fibers;
#ifdef CUDA_EMU_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    const void* main_bottom = nullptr;
    size_t main_size = 0;
    void* sched_fake = nullptr;
    void* sched_tsan = nullptr;
    const std::function<void()>* body = nullptr;
    unsigned nthreads = 0;
    unsigned bar_gen = 0;
    unsigned warp_gen[32] = {};
    std::mt19937_64 rng;
    Group* group = nullptr;  // null: a cluster of one block
    unsigned rank = 0;       // in the group
    dim3 cluster = dim3(1, 1, 1);
    bool cooperative = false;
    TlsBlock tls;  // where this OS thread's __shared__ variables are
    // Addresses ThreadSanitizer synchronizes on.
    char start_sync = 0, end_sync = 0, bar_sync[2] = {}, warp_sync[32][2] = {};
};

inline thread_local Worker* tl_worker = nullptr;
inline thread_local Fiber* tl_fiber = nullptr;
inline thread_local uint3 tl_blockIdx;
inline thread_local dim3 tl_blockDim, tl_gridDim;
inline Fiber* cur() { return ld(tl_fiber); }

[[noreturn]] inline void fail(const char* fmt, ...) {
    // The blocks of a cluster may fail at once: one report, the others wait for the abort.
    static std::mutex reporting;
    reporting.lock();
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cuda_emu: error: block (%u,%u,%u)", tl_blockIdx.x, tl_blockIdx.y,
            tl_blockIdx.z);
    if (Fiber* f = cur()) fprintf(stderr, " thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
    fprintf(stderr, ": ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

inline void tsan_acquire(void* a) {
#ifdef CUDA_EMU_TSAN
    __tsan_acquire(a);
#else
    (void)a;
#endif
}
inline void tsan_release(void* a) {
#ifdef CUDA_EMU_TSAN
    __tsan_release(a);
#else
    (void)a;
#endif
}

// ---- dynamic shared memory: one thread_local array per `extern __shared__` name ----
struct DynamicShared {
    unsigned char* (*addr)();
    size_t size;
    DynamicShared* next;
    static DynamicShared*& head() {
        static DynamicShared* h = nullptr;
        return h;
    }
    DynamicShared(unsigned char* (*a)(), size_t s) : addr(a), size(s), next(head()) { head() = this; }
};
// Defines the array that an `extern __shared__ TYPE NAME[];` of the kernel source names; put it
// before the kernel's source. Its dynamic initializer makes g++ define the array's TLS init
// function, which g++ 12 calls unconditionally for a block-scope `extern thread_local` (without
// one, the call jumps to address 0; -fno-extern-tls-init would also avoid it).
template <class T> T dynamic_shared_init() {
    static volatile int touch = 0;
    (void)touch;  // not a constant expression: the initialization stays dynamic
    return T();
}
#define CUDA_EMU_DYNAMIC_SHARED(TYPE, NAME)                                                       \
    alignas(256) inline thread_local TYPE NAME[CUDA_EMU_MAX_DYNAMIC_SHARED / sizeof(TYPE)] = {    \
        ::cuda_emu::dynamic_shared_init<TYPE>()};                                                 \
    static unsigned char* cuda_emu_dynamic_addr_##NAME() {                                        \
        return reinterpret_cast<unsigned char*>(NAME);                                         \
    }                                                                                          \
    static ::cuda_emu::DynamicShared cuda_emu_dynamic_reg_##NAME(&cuda_emu_dynamic_addr_##NAME, sizeof(NAME));

// ---- fibers ----
// Stacks (a guard page below each) and ThreadSanitizer fibers, kept per OS thread across blocks
// and launches: the blocks' threads are HB-ordered anyway (end_sync -> start_sync).
struct FiberPool {
    struct Slot {
        char* stack;
        size_t size;
        void* tsan;
    };
    std::vector<Slot> slots;
    Slot& get(unsigned i, size_t size) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        if (i >= slots.size()) slots.resize(i + 1, Slot{nullptr, 0, nullptr});
        Slot& s = slots[i];
        if (s.stack && s.size != size) {
            munmap(s.stack - page, s.size + page);
            s.stack = nullptr;
        }
        if (!s.stack) {
            void* m = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) fail("cannot map a fiber stack");
            mprotect(m, page, PROT_NONE);
            s.stack = static_cast<char*>(m) + page;
            s.size = size;
        }
#ifdef CUDA_EMU_TSAN
        if (!s.tsan) s.tsan = __tsan_create_fiber(0);
#endif
        return s;
    }
    ~FiberPool() {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        for (Slot& s : slots) {
            if (s.stack) munmap(s.stack - page, s.size + page);
#ifdef CUDA_EMU_TSAN
            if (s.tsan) __tsan_destroy_fiber(s.tsan);
#endif
        }
    }
};
inline FiberPool& fiber_pool() {
    static thread_local FiberPool pool;
    return pool;
}

inline void resume(Worker& w, Fiber& f) {
    st(tl_fiber, &f);
    // Everything is read before __tsan_switch_to_fiber: TSan files later accesses under `f`.
#ifdef CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(&w.sched_fake, f.stack, f.stack_size);
#endif
#ifdef CUDA_EMU_ASM_SWITCH
    void** const save = &w.sched_sp;
    void* const load = f.sp;
#endif
#ifdef CUDA_EMU_TSAN
    __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CUDA_EMU_ASM_SWITCH
    cuda_emu_switch_x86_64(save, load);
#else
    swapcontext(&w.sched, &f.ctx);
#endif
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
    st(tl_fiber, (Fiber*)nullptr);
}

// Back to the scheduler. A dying fiber releases end_sync last, after its final reads.
inline void yield(bool dying = false) {
    Worker& w = *ld(tl_worker);
    Fiber& f = *cur();
#ifdef CUDA_EMU_ASAN
    __sanitizer_start_switch_fiber(dying ? nullptr : &f.asan_fake, w.main_bottom, w.main_size);
#endif
#ifdef CUDA_EMU_ASM_SWITCH
    void** const save = &f.sp;
    void* const load = w.sched_sp;
#endif
#ifdef CUDA_EMU_TSAN
    void* const sched = w.sched_tsan;
    if (dying) __tsan_release(&w.end_sync);
    __tsan_switch_to_fiber(sched, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef CUDA_EMU_ASM_SWITCH
    cuda_emu_switch_x86_64(save, load);
#else
    swapcontext(&f.ctx, &w.sched);
#endif
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.asan_fake, nullptr, nullptr);
#endif
    (void)dying;
}

inline void fiber_entry() {
    Worker& w = *ld(tl_worker);
#ifdef CUDA_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w.main_bottom, &w.main_size);
#endif
    tsan_acquire(&w.start_sync);
    (*w.body)();
    st(cur()->state, (int)S_DONE);
    yield(true);
    abort();  // never resumed
}

// ---- collectives, called by the kernel's threads ----
inline void syncthreads(const char* file, int line) {
    Worker& w = *ld(tl_worker);
    Fiber& f = *cur();
    const unsigned gen = ld(w.bar_gen);
    st(f.file, file);
    st(f.line, line);
    st(f.state, (int)S_BAR);
    tsan_release(&w.bar_sync[gen & 1]);
    yield();
    tsan_acquire(&w.bar_sync[gen & 1]);
}

inline Group* group_of(const Worker& w, int kind) {
    return w.group && w.group->grid == (kind == G_GRID) ? w.group : nullptr;
}

// cluster.sync() / grid.sync(): __syncthreads over every block of the group. In a launch without
// clusters, the cluster is the block alone.
inline void group_sync(int kind, const char* file, int line) {
    Worker& w = *ld(tl_worker);
    Fiber& f = *cur();
    if (kind == G_GRID && !w.cooperative)
        fail("%s:%d: grid.sync() outside a cooperative launch", file, line);
    Group* g = group_of(w, kind);
    char* sync = g ? g->sync : w.bar_sync;
    const unsigned gen = ld(g ? g->gen : w.bar_gen);
    st(f.file, file);
    st(f.line, line);
    st(f.group, kind);
    st(f.state, (int)S_GROUP);
    tsan_release(&sync[gen & 1]);
    yield();
    tsan_acquire(&sync[gen & 1]);
}

// cluster.map_shared_rank: the same offset in the TLS block of rank's OS thread.
inline void* map_shared(const void* addr, unsigned rank, const char* file, int line) {
    const Worker& w = *ld(tl_worker);
    const Group* g = group_of(w, G_CLUSTER);
    const unsigned size = g ? g->size : 1;
    if (rank >= size)
        fail("%s:%d: map_shared_rank to rank %u of a cluster of %u blocks", file, line, rank, size);
    const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
    const TlsBlock& tls = w.tls;
    if (a < tls.begin || a >= tls.end)
        fail("%s:%d: map_shared_rank of %p, which is not shared memory (a __shared__ variable or "
             "a CUDA_EMU_DYNAMIC_SHARED array)",
             file, line, addr);
    if (!g) return const_cast<void*>(addr);
    return reinterpret_cast<void*>(a - reinterpret_cast<uintptr_t>(&tl_anchor) +
                                   reinterpret_cast<uintptr_t>(g->anchors[rank]));
}

inline unsigned long long warp_collective(int op, unsigned mask, unsigned long long val, int b,
                                          int c, const char* file, int line) {
    Worker& w = *ld(tl_worker);
    Fiber& f = *cur();
    const unsigned warp = f.lin / 32;
    const unsigned gen = ld(w.warp_gen[warp]);
    st(f.op, op);
    st(f.mask, mask);
    st(f.val, val);
    st(f.b, b);
    st(f.c, c);
    st(f.file, file);
    st(f.line, line);
    st(f.state, (int)S_WARP);
    if (op == W_SYNC) tsan_release(&w.warp_sync[warp][gen & 1]);
    yield();
    if (op == W_SYNC) tsan_acquire(&w.warp_sync[warp][gen & 1]);
    return ld(f.res);
}

template <class T>
inline T shuffle(int op, unsigned mask, T var, int b, int width, const char* file, int line) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "shuffles take 1..8-byte scalars");
    if (width <= 0 || width > 32 || (width & (width - 1)))
        fail("%s:%d: shuffle width %d is not a power of 2 in [1, 32]", file, line, width);
    unsigned long long bits = 0;
    memcpy(&bits, &var, sizeof(T));
    const int c = ((32 - width) << 8) | (op == W_UP ? 0 : 0x1f);
    bits = warp_collective(op, mask, bits, b, c, file, line);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

// The source lane of `lane` for a shuffle (PTX shfl.sync: mode, b, c).
inline int shuffle_source(int op, int lane, int b, int c) {
    const int seg = (c >> 8) & 31, clamp = c & 31;
    const int min_lane = lane & seg, max_lane = min_lane | (clamp & ~seg);
    b &= 31;
    int j = lane;
    bool ok = true;
    switch (op) {
        case W_UP: j = lane - b; ok = j >= max_lane; break;
        case W_DOWN: j = lane + b; ok = j <= max_lane; break;
        case W_XOR: j = lane ^ b; ok = j <= max_lane; break;
        default: j = min_lane | (b & ~seg); ok = j <= max_lane; break;
    }
    return ok ? j : lane;
}

// Resolves every warp collective whose lanes have all arrived; returns whether any was.
inline bool resolve_warps(Worker& w) {
    bool any = false;
    const unsigned n = w.nthreads;
    for (unsigned base = 0; base < n; base += 32) {
        for (unsigned l = 0; l < 32 && base + l < n; ++l) {
            Fiber& f = w.fibers[base + l];
            if (ld(f.state) != S_WARP) continue;
            st(tl_fiber, &f);  // for the messages
            const unsigned m = ld(f.mask);
            const int op = ld(f.op), c = ld(f.c);
            const char* file = ld(f.file);
            const int line = ld(f.line);
            if (!((m >> l) & 1))
                fail("%s:%d: warp collective with mask 0x%08x excludes the calling lane %u", file,
                     line, m, l);
            bool ready = true;
            for (unsigned k = 0; k < 32; ++k) {
                if (!((m >> k) & 1)) continue;
                if (base + k >= n)
                    fail("%s:%d: mask 0x%08x names lane %u, past the block's %u threads", file,
                         line, m, k, n);
                Fiber& g = w.fibers[base + k];
                const int gs = ld(g.state);
                if (gs == S_DONE)
                    fail("%s:%d: mask 0x%08x names lane %u, which has exited", file, line, m, k);
                if (gs != S_WARP) {
                    ready = false;
                    continue;
                }
                if (ld(g.mask) != m || ld(g.op) != op || ld(g.c) != c)
                    fail("%s:%d: lane %u waits in another warp collective (%s:%d, op %d, mask "
                         "0x%08x) than lane %u (op %d, mask 0x%08x)",
                         file, line, k, ld(g.file), ld(g.line), ld(g.op), ld(g.mask), l, op, m);
            }
            st(tl_fiber, (Fiber*)nullptr);
            if (!ready) continue;
            unsigned long long ballot = 0;
            for (unsigned k = 0; k < 32; ++k)
                if (((m >> k) & 1) && ld(w.fibers[base + k].val)) ballot |= 1ull << k;
            for (unsigned k = 0; k < 32; ++k) {
                if (!((m >> k) & 1)) continue;
                Fiber& g = w.fibers[base + k];
                unsigned long long r = 0;
                if (op == W_BALLOT) {
                    r = ballot;
                } else if (op != W_SYNC) {
                    const int j = shuffle_source(op, (int)k, ld(g.b), c);
                    if (!((m >> j) & 1)) {
                        st(tl_fiber, &g);
                        fail("%s:%d: shuffle reads lane %d, outside the mask 0x%08x", ld(g.file),
                             ld(g.line), j, m);
                    }
                    r = ld(w.fibers[base + j].val);
                }
                st(g.res, r);
                st(g.state, (int)S_RUN);
            }
            if (op == W_SYNC) st(w.warp_gen[base / 32], ld(w.warp_gen[base / 32]) + 1);
            any = true;
        }
    }
    return any;
}

inline const char* wait_name(const Fiber& f) {
    switch (ld(f.state)) {
        case S_BAR: return "__syncthreads";
        case S_GROUP: return ld(f.group) == G_GRID ? "grid.sync()" : "cluster.sync()";
        default: return "warp collective";
    }
}

// The block's live threads all wait at its group's barrier: wait for the group's other blocks.
inline void group_arrive(Group& g, const Fiber& first) {
    std::unique_lock<std::mutex> l(g.m);
    if (g.done) {
        st(tl_fiber, const_cast<Fiber*>(&first));
        fail("%s:%d: %s.sync(), which block (%u,%u,%u) of the %s never reaches: it has exited (a "
             "divergent %s barrier)",
             ld(first.file), ld(first.line), g.name(), g.exited.x, g.exited.y, g.exited.z,
             g.name(), g.name());
    }
    if (!g.arrived) {
        g.waiter = tl_blockIdx;
        g.wait_file = ld(first.file);
        g.wait_line = ld(first.line);
    }
    const unsigned gen = ld(g.gen);
    if (++g.arrived == g.size) {
        g.arrived = 0;
        st(g.gen, gen + 1);
        g.cv.notify_all();
        return;
    }
    g.cv.wait(l, [&] { return ld(g.gen) != gen; });
}

inline void schedule_block(Worker& w) {
    const Options& o = options();
    const unsigned n = w.nthreads;
    std::vector<unsigned> order(n);
    for (;;) {
        std::iota(order.begin(), order.end(), 0u);
        if (o.order == Options::Reverse) std::reverse(order.begin(), order.end());
        if (o.order == Options::Random) std::shuffle(order.begin(), order.end(), w.rng);
        for (unsigned i : order)
            if (ld(w.fibers[i].state) == S_RUN) resume(w, w.fibers[i]);
        unsigned done = 0, bar = 0, warp = 0, grp = 0;
        for (Fiber& f : w.fibers) {
            const int s = ld(f.state);
            done += s == S_DONE;
            bar += s == S_BAR;
            warp += s == S_WARP;
            grp += s == S_GROUP;
        }
        if (done == n) return;
        if (warp && resolve_warps(w)) continue;
        if ((bar || grp) && bar + grp + done == n) {
            Fiber* first = nullptr;
            for (Fiber& f : w.fibers) {
                const int s = ld(f.state);
                if (s != S_BAR && s != S_GROUP) continue;
                if (!first) {
                    first = &f;
                    continue;
                }
                const bool same_kind = s == ld(first->state) &&
                                       (s == S_BAR || ld(f.group) == ld(first->group));
                // The same __FILE__ literal is almost always the same pointer: strcmp only when not.
                const char* file = ld(f.file);
                if (same_kind && ld(f.line) == ld(first->line) &&
                    (file == ld(first->file) || !strcmp(file, ld(first->file))))
                    continue;
                st(tl_fiber, &f);
                if (s == S_BAR && same_kind)
                    fail("divergent __syncthreads: this thread waits at %s:%d, thread %u at %s:%d",
                         ld(f.file), ld(f.line), first->lin, ld(first->file), ld(first->line));
                fail("threads of the block wait at different barriers: this thread at %s (%s:%d), "
                     "thread %u at %s (%s:%d)",
                     wait_name(f), ld(f.file), ld(f.line), first->lin, wait_name(*first),
                     ld(first->file), ld(first->line));
            }
            if (done && o.strict) {
                st(tl_fiber, first);
                fail("%s:%d: %s reached by %u of the block's %u threads; the others have exited",
                     ld(first->file), ld(first->line), wait_name(*first), bar + grp, n);
            }
            if (grp)
                if (Group* g = group_of(w, ld(first->group))) group_arrive(*g, *first);
            st(w.bar_gen, ld(w.bar_gen) + 1);
            for (Fiber& f : w.fibers)
                if (ld(f.state) == S_BAR || ld(f.state) == S_GROUP) st(f.state, (int)S_RUN);
            continue;
        }
        // No progress possible: describe the first few stuck threads.
        fprintf(stderr, "cuda_emu: deadlock: %u threads at __syncthreads, %u at cluster.sync / "
                        "grid.sync, %u in warp collectives, %u exited\n", bar, grp, warp, done);
        int shown = 0;
        for (Fiber& f : w.fibers) {
            const int s = ld(f.state);
            if (s == S_DONE || shown++ >= 8) continue;
            fprintf(stderr, "  thread %u: %s at %s:%d (mask 0x%08x)\n", f.lin, wait_name(f),
                    ld(f.file), ld(f.line), ld(f.mask));
        }
        fail("divergent barrier or warp collective: the block cannot make progress");
    }
}

// Prepares the calling OS thread to run blocks of the launch as w.
inline void start_worker(Worker& w, unsigned long long seed, dim3 grid, dim3 block,
                         const std::function<void()>& body) {
    const Options& o = options();
    w.body = &body;
    w.nthreads = block.x * block.y * block.z;
    w.rng.seed(o.seed * 0x9e3779b97f4a7c15ull + seed);
#ifdef CUDA_EMU_TSAN
    w.sched_tsan = __tsan_get_current_fiber();
#endif
    w.tls = tls_block();
    st(tl_worker, &w);
    tl_gridDim = grid;
    tl_blockDim = block;
#if defined(CUDA_EMU_ASAN) || defined(CUDA_EMU_TSAN)
    const size_t stack = o.stack_bytes ? o.stack_bytes : 256 * 1024;
#else
    const size_t stack = o.stack_bytes ? o.stack_bytes : 64 * 1024;
#endif
    w.fibers.resize(w.nthreads);
    FiberPool& pool = fiber_pool();
    for (unsigned i = 0; i < w.nthreads; ++i) {
        FiberPool::Slot& s = pool.get(i, stack);
        w.fibers[i].stack = s.stack;
        w.fibers[i].stack_size = s.size;
        w.fibers[i].tsan = s.tsan;
    }
}

inline void end_worker() {
#ifdef CUDA_EMU_ASAN
    for (DynamicShared* d = DynamicShared::head(); d; d = d->next)
        __asan_unpoison_memory_region(d->addr(), d->size);
#endif
    st(tl_worker, (Worker*)nullptr);
}

// Fills the first dyn bytes of the dynamic shared arrays with the poison byte; under ASan,
// poisons them from byte `from` on.
inline void poison_dynamic_shared(size_t dyn, size_t from) {
    for (DynamicShared* d = DynamicShared::head(); d; d = d->next) {
        unsigned char* p = d->addr();
        if (options().poison >= 0) memset(p, options().poison, std::min(dyn, d->size));
#ifdef CUDA_EMU_ASAN
        __asan_poison_memory_region(p + std::min(from, d->size), d->size - std::min(from, d->size));
#else
        (void)from;
#endif
    }
}

// Runs block blk (linear) of the launch with w.
inline void run_block(Worker& w, unsigned blk, dim3 block, size_t dyn) {
    const dim3 grid = tl_gridDim;
    tl_blockIdx = uint3{blk % grid.x, (blk / grid.x) % grid.y, blk / (grid.x * grid.y)};
    poison_dynamic_shared(dyn, dyn);
    w.bar_gen = 0;
    std::fill(std::begin(w.warp_gen), std::end(w.warp_gen), 0u);
    for (unsigned i = 0; i < w.nthreads; ++i) {
        Fiber& f = w.fibers[i];
        f.lin = i;
        f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
        f.state = S_RUN;
        f.file = "";
        f.line = 0;
#ifdef CUDA_EMU_ASAN
        // A finished fiber leaves the redzones of its last frames (fiber_entry, yield: at the
        // top) poisoned; the kernel's frames returned and cleaned theirs.
        const size_t top = std::min<size_t>(f.stack_size, 64 * 1024);
        __asan_unpoison_memory_region(f.stack + f.stack_size - top, top);
#endif
#ifdef CUDA_EMU_ASM_SWITCH
        // The frame cuda_emu_switch_x86_64 pops: MXCSR / x87 control word, r15 .. rbp, then
        // `ret` enters fiber_entry as if called (a null return address above it).
        void** sp = reinterpret_cast<void**>(f.stack + f.stack_size);
        *--sp = nullptr;
        *--sp = reinterpret_cast<void*>(&fiber_entry);
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        --sp;
        const uint32_t csr[2] = {0x1f80u, 0x037fu};  // the ABI's initial MXCSR and x87 CW
        memcpy(sp, csr, sizeof csr);
        f.sp = sp;
#else
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = f.stack_size;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_entry, 0);
#endif
#ifdef CUDA_EMU_TSAN
        char name[64];
        snprintf(name, sizeof name, "block %u thread %u", blk, i);
        __tsan_set_fiber_name(f.tsan, name);
#endif
    }
    tsan_release(&w.start_sync);  // this block's setup, and the previous block's end
    schedule_block(w);
    tsan_acquire(&w.end_sync);
}

inline void run_blocks(unsigned worker, unsigned workers, dim3 grid, dim3 block, size_t dyn,
                       const std::function<void()>& body) {
    Worker w;
    start_worker(w, worker, grid, block, body);
    const unsigned nblocks = grid.x * grid.y * grid.z;
    for (unsigned blk = worker; blk < nblocks; blk += workers) run_block(w, blk, block, dyn);
    end_worker();
}

// Runs block blk, rank `rank` of group g, on the calling OS thread, while the group's other
// blocks run on theirs.
inline void run_group_block(Group& g, unsigned rank, unsigned blk, const LaunchConfig& c,
                            const std::function<void()>& body) {
    Worker w;
    start_worker(w, blk, c.grid, c.block, body);
    w.group = &g;
    w.rank = rank;
    w.cluster = c.cluster;
    w.cooperative = c.cooperative;
    std::unique_lock<std::mutex> l(g.m);
    // map_shared_rank may be called before the first cluster.sync().
    g.anchors[rank] = &tl_anchor;
    if (++g.started == g.size) g.cv.notify_all();
    g.cv.wait(l, [&] { return g.started == g.size; });
    l.unlock();
    run_block(w, blk, c.block, c.dynamic_smem);
    l.lock();
    if (g.arrived)
        fail("exited while block (%u,%u,%u) of its %s waits at %s.sync() at %s:%d (a divergent "
             "%s barrier)",
             g.waiter.x, g.waiter.y, g.waiter.z, g.name(), g.name(), g.wait_file, g.wait_line,
             g.name());
    if (!g.done) g.exited = tl_blockIdx;
    if (++g.done == g.size) g.cv.notify_all();
    l.unlock();
    // A block must not exit while the others of its cluster may read its shared memory: its OS
    // thread, and so its TLS, stays until the cluster is done, the memory poisoned meanwhile.
    poison_dynamic_shared(c.dynamic_smem, 0);
    l.lock();
    g.cv.wait(l, [&] { return g.done == g.size; });
    l.unlock();
    end_worker();
}

// Persistent OS threads that run the blocks of one launch at a time (CUDA_EMU_WORKERS, and the
// blocks of clusters and cooperative grids); their fiber pools survive launches. A mutex and
// condition variables order the launch before its blocks and the blocks before its return.
struct BlockThreads {
    // Held by a launch from start to end: the job is shared (callers on several host threads,
    // e.g. a test harness running tests in parallel, would otherwise overwrite it).
    std::mutex launch;
    std::mutex m;
    std::condition_variable go, done;
    unsigned threads = 0;
    std::function<void(unsigned)> job;
    unsigned long long generation = 0;
    unsigned active = 0, pending = 0;

    // Runs job(0) .. job(n - 1) at once, each on its own thread, and returns when all are done.
    void run(unsigned n, std::function<void(unsigned)> f) {
        std::unique_lock<std::mutex> lock(m);
        for (; threads < n; ++threads) {
            std::thread([id = threads, this] {
                unsigned long long seen = 0;
                std::unique_lock<std::mutex> l(m);
                for (;;) {
                    go.wait(l, [&] { return generation != seen && id < active; });
                    seen = generation;
                    std::function<void(unsigned)> mine = job;
                    l.unlock();
                    mine(id);
                    l.lock();
                    if (--pending == 0) done.notify_all();
                }
            }).detach();
        }
        job = std::move(f);
        active = pending = n;
        ++generation;
        go.notify_all();
        done.wait(lock, [&] { return pending == 0; });
    }
};
inline BlockThreads& block_threads() {
    static BlockThreads* t = new BlockThreads;  // leaked: the threads never stop
    return *t;
}

inline void launch_body(const LaunchConfig& c, const std::function<void()>& body) {
    const Options& o = options();
    const dim3 grid = c.grid, block = c.block, cl = c.cluster;
    const size_t dyn = c.dynamic_smem;
    const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (!grid.x || !grid.y || !grid.z || !threads) fail("launch with an empty grid or block");
    if (threads > 1024 || block.z > 64)
        fail("launch with block (%u,%u,%u): too many threads", block.x, block.y, block.z);
    if (grid.y > 65535 || grid.z > 65535) fail("launch with grid.y or grid.z above 65535");
    if (c.max_dynamic_smem > CUDA_EMU_MAX_DYNAMIC_SHARED)
        fail("launch with max_dynamic_smem %zu, above the %zu bytes a block can have",
             c.max_dynamic_smem, (size_t)CUDA_EMU_MAX_DYNAMIC_SHARED);
    if (dyn > c.max_dynamic_smem)
        fail("launch with %zu bytes of dynamic shared memory (limit %zu: the kernel's "
             "max_dynamic_smem)",
             dyn, c.max_dynamic_smem);
    if (!cl.x || !cl.y || !cl.z || grid.x % cl.x || grid.y % cl.y || grid.z % cl.z)
        fail("launch with cluster (%u,%u,%u), which does not divide grid (%u,%u,%u)", cl.x, cl.y,
             cl.z, grid.x, grid.y, grid.z);
    const unsigned csize = cl.x * cl.y * cl.z, cmax = c.non_portable_cluster ? 16 : 8;
    if (csize > cmax)
        fail("launch with a cluster of %u blocks: at most %u%s", csize, cmax,
             c.non_portable_cluster ? "" : " (16 with non_portable_cluster)");
    if (c.cooperative && csize > 1) fail("cooperative launch with clusters: not emulated");
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    if (c.cooperative && nblocks > max_cooperative_blocks)
        fail("cooperative launch of %llu blocks: at most %u run at once", nblocks,
             max_cooperative_blocks);
    BlockThreads& pool = block_threads();
    if (csize == 1 && !c.cooperative) {
        const unsigned workers =
            (unsigned)std::max(1ull, std::min<unsigned long long>(o.workers, nblocks));
        if (workers == 1) {
            run_blocks(0, 1, grid, block, dyn, body);
            return;
        }
        std::lock_guard<std::mutex> one_launch(pool.launch);
        pool.run(workers, [&](unsigned id) { run_blocks(id, workers, grid, block, dyn, body); });
        return;
    }
    std::lock_guard<std::mutex> one_launch(pool.launch);
    if (c.cooperative) {
        Group g;
        g.grid = true;
        g.size = (unsigned)nblocks;
        g.anchors.resize(g.size);
        pool.run(g.size, [&](unsigned rank) { run_group_block(g, rank, rank, c, body); });
        return;
    }
    // The clusters one after another; rank r of a cluster is its block (r % x, r / x % y, ...).
    for (unsigned cz = 0; cz < grid.z; cz += cl.z)
        for (unsigned cy = 0; cy < grid.y; cy += cl.y)
            for (unsigned cx = 0; cx < grid.x; cx += cl.x) {
                Group g;
                g.size = csize;
                g.anchors.resize(csize);
                pool.run(csize, [&](unsigned r) {
                    const unsigned x = cx + r % cl.x, y = cy + r / cl.x % cl.y,
                                   z = cz + r / (cl.x * cl.y);
                    run_group_block(g, r, x + grid.x * (y + grid.y * z), c, body);
                });
            }
}

// Runs kernel<<<config>>>(args...) (cudaLaunchKernelEx, or cudaLaunchCooperativeKernel): the
// arguments are converted to the kernel's parameter types once, as a launch copies them, and
// every thread gets them by value.
template <class... P, class... A>
void launch_ex(const LaunchConfig& config, void (*kernel)(P...), A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    launch_body(config, body);
}

// Runs kernel<<<grid, block, dyn>>>(args...), with at most options().smem_limit of dyn.
template <class... P, class... A>
void launch(dim3 grid, dim3 block, size_t dyn, void (*kernel)(P...), A&&... args) {
    LaunchConfig config;
    config.grid = grid;
    config.block = block;
    config.dynamic_smem = dyn;
    config.max_dynamic_smem = options().smem_limit;
    launch_ex(config, kernel, std::forward<A>(args)...);
}

}  // namespace cuda_emu

// ---- built-in variables ----
#define threadIdx (::cuda_emu::cur()->tid)
#define blockIdx (::cuda_emu::tl_blockIdx)
#define blockDim (::cuda_emu::tl_blockDim)
#define gridDim (::cuda_emu::tl_gridDim)
#ifndef warpSize
#define warpSize 32
#endif

// ---- barriers, warp collectives, fences ----
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    ::cuda_emu::warp_collective(::cuda_emu::W_SYNC, mask, 0, 0, 0, file, line);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_emu::shuffle(::cuda_emu::W_IDX, mask, var, src, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_emu::shuffle(::cuda_emu::W_UP, mask, var, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_emu::shuffle(::cuda_emu::W_DOWN, mask, var, (int)delta, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_emu::shuffle(::cuda_emu::W_XOR, mask, var, lane_mask, width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return (unsigned)::cuda_emu::warp_collective(::cuda_emu::W_BALLOT, mask, pred != 0, 0, 0, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return __ballot_sync(mask, pred, file, line) != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return __ballot_sync(mask, pred, file, line) == mask;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
template <class T> inline T __ldg(const T* p) { return *p; }

// ---- cooperative groups: what <cooperative_groups.h> (included only under __CUDACC__) gives ----
namespace cooperative_groups {
class thread_block {
  public:
    void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        ::cuda_emu::syncthreads(file, line);
    }
    unsigned thread_rank() const { return ::cuda_emu::cur()->lin; }
    unsigned num_threads() const { return blockDim.x * blockDim.y * blockDim.z; }
    dim3 thread_index() const { return threadIdx; }
    dim3 group_index() const { return blockIdx; }
    dim3 dim_threads() const { return blockDim; }
};
inline thread_block this_thread_block() { return {}; }

// The block's cluster (sm_90); a launch without clusters has clusters of one block.
class cluster_group {
  public:
    void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        ::cuda_emu::group_sync(::cuda_emu::G_CLUSTER, file, line);
    }
    dim3 dim_blocks() const { return ::cuda_emu::ld(::cuda_emu::tl_worker)->cluster; }
    dim3 block_index() const {
        const dim3 c = dim_blocks();
        return dim3(blockIdx.x % c.x, blockIdx.y % c.y, blockIdx.z % c.z);
    }
    unsigned num_blocks() const {
        const dim3 c = dim_blocks();
        return c.x * c.y * c.z;
    }
    unsigned block_rank() const {
        const dim3 c = dim_blocks(), i = block_index();
        return i.x + c.x * (i.y + c.y * i.z);
    }
    unsigned num_threads() const { return num_blocks() * blockDim.x * blockDim.y * blockDim.z; }
    unsigned thread_rank() const {
        return block_rank() * blockDim.x * blockDim.y * blockDim.z + ::cuda_emu::cur()->lin;
    }
    // The same shared variable (or offset into a dynamic shared array) in block `rank`.
    template <class T>
    T* map_shared_rank(T* addr, unsigned rank, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) const {
        return static_cast<T*>(::cuda_emu::map_shared(addr, rank, file, line));
    }
};
inline cluster_group this_cluster() { return {}; }

// The grid; sync() only in a cooperative launch.
class grid_group {
  public:
    void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
        ::cuda_emu::group_sync(::cuda_emu::G_GRID, file, line);
    }
    bool is_valid() const { return ::cuda_emu::ld(::cuda_emu::tl_worker)->cooperative; }
    unsigned long long num_blocks() const {
        return (unsigned long long)gridDim.x * gridDim.y * gridDim.z;
    }
    unsigned long long block_rank() const {
        return blockIdx.x + (unsigned long long)gridDim.x * (blockIdx.y + (unsigned long long)gridDim.y * blockIdx.z);
    }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// ---- atomics (blocks may run on several workers) ----
template <class T> inline T atomicAdd(T* p, T v) {
    if constexpr (std::is_integral<T>::value) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    } else {
        T old = *p, want;
        do {
            want = old + v;
        } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED));
        return old;
    }
}
template <class T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
template <class T> inline T atomicCAS(T* p, T cmp, T v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
template <class T> inline T atomicMax(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class T> inline T atomicMin(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// ---- device math that glibc lacks ----
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float v) { int i; memcpy(&i, &v, 4); return i; }
inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float v) { unsigned i; memcpy(&i, &v, 4); return i; }
inline double __longlong_as_double(long long v) { double d; memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double v) { long long i; memcpy(&i, &v, 8); return i; }
namespace cuda_emu {
// sin(pi x) with the exact reduction of x modulo 2 (as CUDA's sinpi).
inline double sinpi_(double x) {
    if (!std::isfinite(x)) return NAN;
    double r = std::remainder(x, 2.0);  // exact, in [-1, 1]
    if (r > 0.5) r = 1.0 - r;
    else if (r < -0.5) r = -1.0 - r;
    if (r == 0) return std::copysign(0.0, x);
    return (double)std::sin((long double)3.14159265358979323846264338327950288L * r);
}
inline double cospi_(double x) {
    if (!std::isfinite(x)) return NAN;
    const double r = std::fabs(std::remainder(x, 2.0));  // [0, 1]
    if (r == 0.5) return 0.0;
    return (double)std::sin((long double)3.14159265358979323846264338327950288L * (0.5L - r));
}
}  // namespace cuda_emu
#if !(defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 41)))
inline double sinpi(double x) { return ::cuda_emu::sinpi_(x); }
inline double cospi(double x) { return ::cuda_emu::cospi_(x); }
inline float sinpif(float x) { return (float)::cuda_emu::sinpi_(x); }
inline float cospif(float x) { return (float)::cuda_emu::cospi_(x); }
#endif
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
