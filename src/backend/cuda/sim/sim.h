// A CPU stand-in for the CUDA execution model, just enough to run dmkd's
// kernel sources unchanged: every thread of a block is an OS thread,
// __syncthreads is a std::barrier, __shared__ arrays are function statics
// (blocks run one after another, so one block owns them at a time).
// Compiled with -ffp-contract=off so a*b + c rounds twice, as the kernels
// do under NVRTC's --fmad=false. Used by tests/cuda_nvrtc.rs.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct SimDim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local SimDim3 threadIdx, blockIdx;
SimDim3 blockDim, gridDim;
std::barrier<>* sim_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { sim_barrier->arrive_and_wait(); }
inline float __int_as_float(unsigned x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline double __longlong_as_double(long long x) {
    double d;
    std::memcpy(&d, &x, 8);
    return d;
}

// Run `kernel` on a grid of `grid` blocks of `block` threads.
template <class F>
void sim_launch(unsigned grid, unsigned block, F kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> bar(block);
        sim_barrier = &bar;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&, b, t] {
                blockIdx.x = b;
                threadIdx.x = t;
                kernel();
            });
        }
        for (auto& th : threads) th.join();
    }
}
