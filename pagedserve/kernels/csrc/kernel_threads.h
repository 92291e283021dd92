// The threads the kernels in this folder share their work with: a parallel_for in which the calling thread
// starts on the chunks at once and helper threads join as they wake, each claiming one chunk at a time.
//
// Why not at::parallel_for: with OpenMP's passive wait (engine/cpu_threads.py), every parallel region wakes its
// helpers from sleep and then waits at a barrier for all of them. On a VM whose idle vCPUs halt, a wake-up costs
// tens of microseconds, and a decode step runs dozens of regions of about a hundred microseconds each: two threads
// took longer than one (docs/benchmarks.md). Here no region waits for a thread to wake: a helper that is late
// finds the chunks taken and goes back to waiting, and a helper that a busy neighbour keeps off its core leaves
// its share to the caller.
//
// How a helper waits (PAGEDSERVE_CPU_SPIN_US, read once; engine/cpu_threads.py sets it from the CPU plan): it
// spins that long after a region before it sleeps, so that the next regions of a step find it awake. That pays
// on CPUs that are the process's alone (pinned); on shared ones a spinning thread takes time from its
// neighbours and the scheduler then runs it last, so there the default is 0: sleep at once.
//
// Invariants:
// * every chunk runs exactly once, and parallel_for returns only when all have run (so the body may use the
//   caller's stack);
// * chunk boundaries depend only on the range, the grain and the thread count, never on which thread runs a
//   chunk or when: a kernel's results do not depend on timing;
// * one region at a time: a call from inside a chunk, or from a second thread while a region runs, runs its whole
//   range on the calling thread;
// * an exception thrown in a chunk is rethrown by parallel_for after every claimed chunk has finished (the first
//   one, if several threw).
// Helpers are created on first use from inside an OpenMP region, one by each OpenMP thread but the first, so each
// inherits that thread's CPU affinity (the pinning of PAGEDSERVE_CPU_BIND). After fork() the child has no helpers
// and runs every range on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#define PAGEDSERVE_KERNEL_THREADS 1
#endif

namespace kernel_threads {

// Chunks per thread of a region: several, so that a helper joining late still takes a share, few enough that a
// chunk's own set-up (scratch buffers, tile configuration) stays small beside its work.
constexpr int64_t kChunksPerThread = 4;

#if defined(PAGEDSERVE_KERNEL_THREADS)

// The region being run: what its chunks call and over which range. Written by the caller before it publishes the
// region; read by a helper only after it has claimed a chunk, which the caller waits for before it writes again.
struct Region {
  void (*call)(const void* body, int64_t first, int64_t last) = nullptr;
  const void* body = nullptr;
  int64_t begin = 0, end = 0, chunk_size = 1;
};

// The claim word: generation (24 bits) | chunks of the region (20) | next unclaimed chunk (20).
constexpr int kIndexBits = 20;
constexpr uint64_t kIndexMask = (uint64_t{1} << kIndexBits) - 1;
constexpr int64_t kMaxChunks = int64_t{1} << (kIndexBits - 1);
inline uint64_t generation_of(uint64_t w) { return w >> (2 * kIndexBits); }
inline int64_t chunks_of(uint64_t w) { return static_cast<int64_t>((w >> kIndexBits) & kIndexMask); }
inline int64_t next_of(uint64_t w) { return static_cast<int64_t>(w & kIndexMask); }

// A spin-wait's pause: lets the other hardware thread of the core run, and saves power.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

inline long futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op | FUTEX_PRIVATE_FLAG, value, nullptr, nullptr, 0);
}

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = [] {  // never destroyed: helpers may still wait on it while the process exits
      auto* p = new Pool();
      pthread_atfork(nullptr, nullptr, [] { Pool::get().forget_helpers(); });
      return p;
    }();
    return *pool;
  }

  template <typename F>
  void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
    const int64_t n = end - begin;
    if (n <= 0) return;
    grain = std::max<int64_t>(1, grain);
    const int64_t threads = at::get_num_threads();
    if (threads <= 1 || n <= grain || in_chunk_ || forked_) {
      body(begin, end);
      return;
    }
    std::unique_lock<std::mutex> caller(caller_mutex_, std::try_to_lock);
    if (!caller.owns_lock()) {  // another thread's region is running
      body(begin, end);
      return;
    }
    ensure_helpers(threads - 1);
    const int64_t wanted = std::min({(n + grain - 1) / grain, threads * kChunksPerThread, kMaxChunks});
    region_.call = [](const void* b, int64_t first, int64_t last) { (*static_cast<const F*>(b))(first, last); };
    region_.body = &body;
    region_.begin = begin;
    region_.end = end;
    region_.chunk_size = (n + wanted - 1) / wanted;
    const int64_t chunks = (n + region_.chunk_size - 1) / region_.chunk_size;
    done_.store(0, std::memory_order_relaxed);
    helpers_allowed_ = threads - 1;
    generation_ = (generation_ + 1) & ((uint64_t{1} << (64 - 2 * kIndexBits)) - 1);
    claim_.store((generation_ << (2 * kIndexBits)) | (static_cast<uint64_t>(chunks) << kIndexBits),
                 std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      wake_.fetch_add(1, std::memory_order_seq_cst);
      futex(&wake_, FUTEX_WAKE, INT_MAX);
    }
    run_chunks(generation_);
    // Chunks a helper claimed may still be running: wait for them (they are short; yield if one was preempted).
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) {
        cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      std::rethrow_exception(e);
    }
  }

 private:
  Pool() {
    const char* spin = std::getenv("PAGEDSERVE_CPU_SPIN_US");
    spin_ns_ = (spin != nullptr && *spin != '\0') ? std::max(0L, std::atol(spin)) * 1000L : kDefaultSpinNs;
  }

  static constexpr long kDefaultSpinNs = 0;

  // Claims and runs chunks of generation ``gen`` until none is left.
  void run_chunks(uint64_t gen) {
    uint64_t w = claim_.load(std::memory_order_acquire);
    for (;;) {
      if (generation_of(w) != gen || next_of(w) >= chunks_of(w)) return;
      if (!claim_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t first = region_.begin + next_of(w) * region_.chunk_size;
      const int64_t last = std::min(region_.end, first + region_.chunk_size);
      in_chunk_ = true;
      try {
        region_.call(region_.body, first, last);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      in_chunk_ = false;
      done_.fetch_add(1, std::memory_order_release);
      w = claim_.load(std::memory_order_acquire);
    }
  }

  void helper_loop(int64_t index) {
    uint64_t seen = generation_of(claim_.load(std::memory_order_acquire));
    for (;;) {
      uint64_t w = claim_.load(std::memory_order_acquire);
      if (generation_of(w) == seen && spin_ns_ > 0) {
        const auto spin_until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin_ns_);
        for (int i = 0;; ++i) {
          cpu_relax();
          w = claim_.load(std::memory_order_acquire);
          if (generation_of(w) != seen) break;
          if ((i & 63) == 63 && std::chrono::steady_clock::now() >= spin_until) break;
        }
      }
      while (generation_of(w) == seen) {  // sleep until the next region
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        const uint32_t ticket = wake_.load(std::memory_order_seq_cst);
        w = claim_.load(std::memory_order_seq_cst);
        if (generation_of(w) == seen) futex(&wake_, FUTEX_WAIT, ticket);
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
        w = claim_.load(std::memory_order_acquire);
      }
      seen = generation_of(w);
      if (index < helpers_allowed_) run_chunks(seen);
    }
  }

  // Starts helpers up to ``count``, each from the OpenMP thread of the same rank + 1 (see the top of the file).
  void ensure_helpers(int64_t count) {
    if (helpers_ >= count) return;
    const int64_t have = helpers_;
    // OpenMP thread r runs ranks [r, r + 1) when the team is full; a smaller team's threads start several ranks,
    // and a call made inside an OpenMP region runs them all here, with the caller's affinity.
    at::parallel_for(0, count + 1, 1, [&](int64_t first, int64_t last) {
      for (int64_t rank = std::max<int64_t>(first, have + 1); rank < last; ++rank) {
        std::thread([this, rank] {
          pthread_setname_np(pthread_self(), "pagedserve-cpu");  // how top -H and /proc name it
          helper_loop(rank - 1);
        }).detach();
      }
    });
    helpers_ = count;
  }

  // In a fork()'s child: the helpers did not come along, and a region may have been half done.
  void forget_helpers() { forked_ = true; }

  Region region_;
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<uint32_t> wake_{0};
  std::atomic<int> sleeping_{0};
  uint64_t generation_ = 0;
  int64_t helpers_ = 0;
  bool forked_ = false;
  std::atomic<int64_t> helpers_allowed_{0};
  long spin_ns_ = kDefaultSpinNs;
  std::mutex caller_mutex_, error_mutex_;
  std::exception_ptr error_;
  static inline thread_local bool in_chunk_ = false;
};

// at::parallel_for's contract: body(first, last) over chunks of [begin, end), each at least ``grain`` long
// (but the last); on the kernels' shared threads.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  Pool::get().parallel_for(begin, end, grain, body);
}

#else  // not Linux: OpenMP's threads

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& body) {
  at::parallel_for(begin, end, grain, body);
}

#endif

}  // namespace kernel_threads
