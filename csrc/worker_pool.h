// A tiny persistent thread pool for the U-Net runtime: the calling thread plus n-1 workers run one
// job at a time, each on its own slice. A plan dispatches a few hundred short jobs (one per weight
// layer and denoising step, tens to hundreds of microseconds each), so a condition-variable wake-up
// per job would cost a large share of the work: workers spin on a generation counter for a short
// while after each job and only then sleep, so back-to-back jobs never hit the kernel and an idle
// engine burns no CPU. A job is cut into size() slices that threads take from an atomic counter,
// caller included: when another process holds a core and a worker is not running, the caller does
// its slice too instead of waiting a whole time slice for it (measured: a 2 ms plan took 200 ms).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace dpag {

class WorkerPool {
public:
    // fn(ctx, slice, n_slices) for every slice in [0, size()), each exactly once, on whichever
    // thread takes it. A plain function pointer and context, so a dispatch never allocates.
    using Job = void (*)(void* ctx, int tid, int n_threads);

    explicit WorkerPool(int n_threads);
    ~WorkerPool();
    WorkerPool(const WorkerPool&) = delete;
    WorkerPool& operator=(const WorkerPool&) = delete;

    int size() const { return n_threads_; }
    // Runs fn on every thread and returns when all slices are done. One caller at a time.
    void run(Job fn, void* ctx);

private:
    void worker(int tid);
    void run_slices();

    int n_threads_;
    std::vector<std::thread> threads_;
    std::atomic<std::uint64_t> generation_{0};
    std::atomic<int> next_{0};  // the next slice to take
    std::atomic<int> done_{0};  // slices finished
    Job job_ = nullptr;
    void* ctx_ = nullptr;
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::condition_variable wake_;
};

}  // namespace dpag
