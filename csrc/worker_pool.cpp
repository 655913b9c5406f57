#include "worker_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DPAG_PAUSE() _mm_pause()
#else
#define DPAG_PAUSE() std::this_thread::yield()
#endif

namespace dpag {
namespace {
// About 100-200 us of spinning on current x86 (pause is tens of cycles): longer than the gap
// between two layers of one plan, much shorter than the gap between plans at a 10 Hz planning rate.
constexpr int kSpinIterations = 1 << 12;
}  // namespace

WorkerPool::WorkerPool(int n_threads) : n_threads_(n_threads < 1 ? 1 : n_threads) {
    for (int tid = 1; tid < n_threads_; ++tid) threads_.emplace_back(&WorkerPool::worker, this, tid);
}

WorkerPool::~WorkerPool() {
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_.store(true);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
}

void WorkerPool::run(Job fn, void* ctx) {
    if (n_threads_ == 1) return fn(ctx, 0, 1);
    job_ = fn;
    ctx_ = ctx;
    done_.store(0, std::memory_order_relaxed);
    next_.store(0, std::memory_order_release);  // the slices are up for grabs from here on
    {
        // Publishing under the mutex means a worker that is about to sleep cannot miss the job;
        // uncontended, this costs tens of nanoseconds, and notify without sleepers makes no syscall.
        std::lock_guard<std::mutex> lock(mutex_);
        generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    run_slices();
    // Spin briefly, then yield: a worker that took a slice may be queued behind us on our core.
    for (int spins = 0; done_.load(std::memory_order_acquire) != n_threads_;) {
        if (++spins < kSpinIterations) {
            DPAG_PAUSE();
        } else {
            std::this_thread::yield();
        }
    }
}

void WorkerPool::run_slices() {
    for (int slice; (slice = next_.fetch_add(1, std::memory_order_acq_rel)) < n_threads_;) {
        job_(ctx_, slice, n_threads_);
        done_.fetch_add(1, std::memory_order_acq_rel);
    }
}

void WorkerPool::worker(int) {
    std::uint64_t seen = 0;
    for (;;) {
        int spins = 0;
        while (generation_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_relaxed)) {
            if (++spins < kSpinIterations) {
                DPAG_PAUSE();
                continue;
            }
            std::unique_lock<std::mutex> lock(mutex_);
            wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen || stop_.load(); });
        }
        if (stop_.load()) return;
        seen = generation_.load(std::memory_order_acquire);
        run_slices();
    }
}

}  // namespace dpag
