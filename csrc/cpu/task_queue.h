// Tasks handed out in chunks to whichever thread asks first, for the CPU
// kernels that split a product or an op's rows over the threads.
//
// An even static split (at::parallel_for's) makes every thread wait at the
// op's end for the slowest one; on a shared or virtual machine a thread is
// often slowed for a while (another tenant, an interrupt), and the waits then
// took about a tenth of a decoder step. Here a thread that is ahead takes the
// next chunk instead. Which thread computes a task never changes its result:
// each task's outputs are computed by the same code from the same inputs, so
// the results are bit-identical to the static split's (tests/test_linear.py,
// tests/test_fused_step.py).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace seqfuse {
namespace cpu {

// Chunks of about count / (threads * 8) tasks (at least `min_chunk`): small
// enough that the last ones even out the threads, large enough that the
// shared counter is touched rarely and each chunk keeps the tasks' order
// (their locality in the weight panels). Under 32 tasks a thread, one even
// chunk each: the counter's cache line moving between the threads costs
// more there than the waits it saves (a decoder step of a few rows).
inline int64_t task_chunk(int64_t count, int64_t threads, int64_t min_chunk = 1) {
  threads = std::max<int64_t>(threads, 1);
  if (count < threads * 32) return std::max<int64_t>(1, (count + threads - 1) / threads);
  return std::max<int64_t>(min_chunk, count / (threads * 8));
}

// A counter of tasks [0, count): next() gives the calling thread the next
// chunk [*b, *e), or false once every task has been handed out. Shared by
// the threads of one parallel region (or one parallel_for).
class TaskQueue {
 public:
  TaskQueue() = default;
  TaskQueue(const TaskQueue&) = delete;
  TaskQueue& operator=(const TaskQueue&) = delete;

  bool next(int64_t count, int64_t chunk, int64_t* b, int64_t* e) {
    const int64_t s = next_.fetch_add(chunk, std::memory_order_relaxed);
    if (s >= count) return false;
    *b = s;
    *e = std::min(count, s + chunk);
    return true;
  }

 private:
  std::atomic<int64_t> next_{0};
};

// fn(b, e) over chunks of tasks [0, count), as at::parallel_for(0, count,
// min_chunk, fn) but with the chunks handed out by a TaskQueue: on the
// calling thread, in one call, when there are no more than min_chunk tasks,
// one thread, or when already inside a parallel region.
template <typename F>
void parallel_chunks(int64_t count, int64_t min_chunk, const F& fn) {
  if (count <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  if (count <= min_chunk || threads <= 1 || at::in_parallel_region()) {
    fn(0, count);
    return;
  }
  const int64_t chunk = task_chunk(count, threads, min_chunk);
  TaskQueue queue;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t b, e;
    while (queue.next(count, chunk, &b, &e)) fn(b, e);
  });
}

}  // namespace cpu
}  // namespace seqfuse
