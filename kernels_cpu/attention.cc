// Fused grouped-query attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Why: XLA's CPU backend has no fused attention. It runs the scores, the mask, the softmax and
// the PV product as separate passes over [B, K, G, L, S] tensors, and the small batched
// einsums (contracting over head_dim) at a fraction of its matmul speed. PyTorch runs the same
// model with one fused kernel (scaled_dot_product_attention). Here each (batch row, kv head)
// is one task: its scores live in a [rows, keys] block that stays in cache, the mask is applied
// while the block is hot, and key blocks that the mask rules out entirely are skipped.
//
// The mask rule is the project's (pathways_jax/models/attention.py): query i sees key j iff
// q_seg[i] == kv_seg[j], kv_seg[j] != 0 and, when causal, kv_pos[j] <= q_pos[i]. A query that
// sees no key gets a zero output (and zero gradients).
//
// Layouts (float32, row-major): q [B, L, H, D], k and v [B, S, K, D], segment ids and positions
// [B, L] / [B, S] int32, lse [B, H, L]. H is a multiple of K; query head h uses kv head h / (H/K).
// The matmuls are written with GCC/Clang vector extensions, so the compiler emits AVX2/FMA when
// built with -mavx2 -mfma and narrower vectors otherwise.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline v8i load8i(const int32_t* p) {
  v8i v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
inline float hsum(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}
inline float hmax(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for x <= 0 (softmax arguments), to about 2 ulp: 2^n * p(r), r = x - n ln2, |r| <= ln2/2.
inline v8f exp8(v8f x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  const v8f u = x * splat(1.44269504088896341f) + splat(0.5f);
  const v8f t = __builtin_convertvector(__builtin_convertvector(u, v8i), v8f);  // toward zero
  const v8f n = t + __builtin_convertvector(t > u, v8f);  // floor(u): true is -1
  v8f r = x - n * splat(0.693145751953125f);
  r = r - n * splat(1.428606765330187045e-06f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// C[M, N] (+)= A[M, Kd] B[Kd, N]. A(m, k) = A[m * rsa + k * csa] (so a transposed operand needs
// no copy); B and C are row-major with leading dimensions ldb, ldc. Register tiles of 4 x 16.
template <int MR, int NV>
inline void tile(int kd, const float* a, long rsa, long csa, const float* b, long ldb, float* c,
                 long ldc, bool accumulate) {
  v8f acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load8(c + r * ldc + 8 * v) : splat(0.f);
  for (int k = 0; k < kd; ++k) {
    v8f bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load8(b + k * ldb + 8 * v);
    for (int r = 0; r < MR; ++r) {
      const v8f av = splat(a[r * rsa + k * csa]);
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store8(c + r * ldc + 8 * v, acc[r][v]);
}

template <int NV>
inline void tile_rows(int mr, int kd, const float* a, long rsa, long csa, const float* b, long ldb,
                      float* c, long ldc, bool acc) {
  switch (mr) {
    case 4: tile<4, NV>(kd, a, rsa, csa, b, ldb, c, ldc, acc); break;
    case 3: tile<3, NV>(kd, a, rsa, csa, b, ldb, c, ldc, acc); break;
    case 2: tile<2, NV>(kd, a, rsa, csa, b, ldb, c, ldc, acc); break;
    default: tile<1, NV>(kd, a, rsa, csa, b, ldb, c, ldc, acc); break;
  }
}

void gemm(int m, int n, int kd, const float* a, long rsa, long csa, const float* b, long ldb,
          float* c, long ldc, bool accumulate) {
  int n0 = 0;
  for (; n0 + 16 <= n; n0 += 16)
    for (int m0 = 0; m0 < m; m0 += 4)
      tile_rows<2>(std::min(4, m - m0), kd, a + m0 * rsa, rsa, csa, b + n0, ldb,
                   c + m0 * ldc + n0, ldc, accumulate);
  for (; n0 + 8 <= n; n0 += 8)
    for (int m0 = 0; m0 < m; m0 += 4)
      tile_rows<1>(std::min(4, m - m0), kd, a + m0 * rsa, rsa, csa, b + n0, ldb,
                   c + m0 * ldc + n0, ldc, accumulate);
  for (; n0 < n; ++n0)
    for (int i = 0; i < m; ++i) {
      float s = accumulate ? c[i * ldc + n0] : 0.f;
      for (int k = 0; k < kd; ++k) s += a[i * rsa + k * csa] * b[k * ldb + n0];
      c[i * ldc + n0] = s;
    }
}

// Runs fn(0..n-1) on the caller and up to the pool's other threads; returns when all are done.
// The caller takes tasks too, so a busy pool only means fewer helpers, never a wait for one.
void parallel_for(ffi::ThreadPool& pool, int n, const std::function<void(int)>& fn) {
  struct State {
    std::atomic<int> next{0}, done{0};
    int n;
    const std::function<void(int)>* fn;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  auto work = [state] {
    for (int t; (t = state->next.fetch_add(1)) < state->n;) {
      (*state->fn)(t);
      if (state->done.fetch_add(1) + 1 == state->n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), n) - 1);
  for (int i = 0; i < helpers; ++i) pool.Schedule([state, work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

constexpr int kRows = 16;  // query rows per score block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Dims {
  int64_t b, l, s, h, kh, d;
};

struct Masks {
  const int32_t *q_seg, *kv_seg, *q_pos, *kv_pos;
  bool causal;
};

// For batch row bi: each query's [lo, hi) key range holding all the keys it may see (empty if
// none), whether those keys are exactly the range (`exact`: then no per-key mask test is
// needed), and per block of kRows queries the union of the ranges.
//
// Packed rows (each segment one contiguous run of keys, positions non-decreasing inside it, or
// no causality) are resolved in O(S + L log S): the range is the query's segment run, cut at
// the last key whose position is not after the query's. Anything else is scanned key by key.
struct KeyRanges {
  std::vector<int> lo, hi, block_lo, block_hi;
  std::vector<char> exact;
  struct Run {
    int32_t seg;
    int start, end;
    bool operator<(const Run& o) const { return seg < o.seg; }
  };
  std::vector<Run> runs;

  // Reuses its vectors: one KeyRanges per thread (thread_ranges) serves every task it runs.
  void compute(const Masks& m, const Dims& dm, int64_t bi) {
    lo.assign(dm.l, 0);
    hi.assign(dm.l, 0);
    exact.assign(dm.l, 0);
    block_lo.clear();
    block_hi.clear();
    runs.clear();
    const int32_t* qs = m.q_seg + bi * dm.l;
    const int32_t* qp = m.q_pos + bi * dm.l;
    const int32_t* ks = m.kv_seg + bi * dm.s;
    const int32_t* kp = m.kv_pos + bi * dm.s;
    bool packed = true;
    for (int j = 0; j < dm.s && packed; ++j) {
      if (j > 0 && ks[j] == ks[j - 1]) {
        runs.back().end = j + 1;
        packed = !m.causal || kp[j] >= kp[j - 1];
      } else {
        runs.push_back({ks[j], j, j + 1});
      }
    }
    std::sort(runs.begin(), runs.end());
    for (size_t r = 1; r < runs.size() && packed; ++r) packed = runs[r].seg != runs[r - 1].seg;
    for (int64_t i = 0; i < dm.l; ++i) {
      if (packed) {
        const auto it = std::lower_bound(runs.begin(), runs.end(), Run{qs[i], 0, 0});
        int a = 0, b = 0;
        if (qs[i] != 0 && it != runs.end() && it->seg == qs[i]) {
          a = it->start;
          b = m.causal ? static_cast<int>(std::upper_bound(kp + a, kp + it->end, qp[i]) - kp)
                       : it->end;
        }
        lo[i] = a;
        hi[i] = std::max(a, b);
        exact[i] = 1;
        continue;
      }
      int first = -1, last = -1, count = 0;
      for (int j = 0; j < dm.s; ++j)
        if (ks[j] == qs[i] && ks[j] != 0 && (!m.causal || kp[j] <= qp[i])) {
          if (first < 0) first = j;
          last = j;
          ++count;
        }
      lo[i] = first < 0 ? 0 : first;
      hi[i] = first < 0 ? 0 : last + 1;
      exact[i] = count == hi[i] - lo[i];
    }
    for (int64_t i0 = 0; i0 < dm.l; i0 += kRows) {
      int blo = static_cast<int>(dm.s), bhi = 0;
      for (int64_t i = i0; i < std::min<int64_t>(i0 + kRows, dm.l); ++i)
        if (hi[i] > lo[i]) {
          blo = std::min(blo, lo[i]);
          bhi = std::max(bhi, hi[i]);
        }
      block_lo.push_back(blo);
      block_hi.push_back(std::max(blo, bhi));
    }
  }
};

// Per-thread scratch, kept for the process's life: with the trainer's single malloc arena
// (pathways_jax/host_memory.py), per-task allocations made the threads queue on its lock.
struct Scratch {
  KeyRanges ranges;
  std::vector<float> kt, vt, p, dp, sums;
};

Scratch& thread_scratch(const Dims& dm) {
  thread_local Scratch s;
  const size_t kv = dm.d * dm.s, block = kRows * ((dm.s + 7) & ~7);
  if (s.kt.size() < kv) s.kt.resize(kv), s.vt.resize(kv);
  if (s.p.size() < block) s.p.resize(block), s.dp.resize(block);
  if (s.sums.size() < kRows) s.sums.resize(kRows);
  return s;
}

// Row r of a score block, [nj] of a row padded to ld (a multiple of 8): every entry outside the
// query's keys, padding included, becomes -inf, in place.
void mask_row(float* pr, int nj, int ld, int jlo, const KeyRanges& kr, int64_t i, const Masks& m,
              const Dims& dm, int64_t bi) {
  const int a = std::clamp(kr.lo[i] - jlo, 0, nj), b = std::clamp(kr.hi[i] - jlo, a, nj);
  std::fill(pr, pr + a, kNegInf);
  std::fill(pr + b, pr + ld, kNegInf);
  if (kr.exact[i]) return;
  const int32_t qs = m.q_seg[bi * dm.l + i], qp = m.q_pos[bi * dm.l + i];
  const int32_t* ks = m.kv_seg + bi * dm.s + jlo;
  const int32_t* kp = m.kv_pos + bi * dm.s + jlo;
  for (int j = a; j < b; ++j)
    if (!(ks[j] == qs && ks[j] != 0 && (!m.causal || kp[j] <= qp))) pr[j] = kNegInf;
}

inline int round_up8(int n) { return (n + 7) & ~7; }

// Scores of query rows [i0, i0 + rows) against keys [jlo, jlo + nj) into p (rows padded to
// ld = round_up8(nj)); kt holds scale * K^T. Then per row, over the keys it may see (others 0):
// forward, exp(s - max), with the row's sum returned in `sums` and its lse written (rows are
// normalised later, on the output); backward, exp(s - lse), the probabilities themselves. A row
// that sees no key is all 0 and its lse -inf.
void scores_to_probs(const float* q_rows, long ldq, const float* kt, long ldkt, int rows, int nj,
                     int dd, const KeyRanges& kr, const Masks& m, const Dims& dm, int64_t bi,
                     int64_t i0, int jlo, float* p, float* lse_rows, float* sums, bool forward) {
  const int ld = round_up8(nj);
  gemm(rows, nj, dd, q_rows, ldq, 1, kt + jlo, ldkt, p, ld, false);
  for (int r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* pr = p + r * ld;
    const int a = std::clamp(kr.lo[i] - jlo, 0, nj), b = std::clamp(kr.hi[i] - jlo, a, nj);
    if (a == b || (!forward && lse_rows[r] == kNegInf)) {
      std::fill(pr, pr + ld, 0.f);
      if (forward) {
        lse_rows[r] = kNegInf;
        sums[r] = 1.f;
      }
      continue;
    }
    mask_row(pr, nj, ld, jlo, kr, i, m, dm, bi);
    const int a8 = a & ~7, b8 = round_up8(b);  // whole vectors; the extra entries are -inf
    float shift;
    if (forward) {
      v8f vmax = splat(kNegInf);
      for (int j = a8; j < b8; j += 8) {
        const v8f s = load8(pr + j);
        vmax = vmax > s ? vmax : s;
      }
      shift = hmax(vmax);
    } else {
      shift = lse_rows[r];
    }
    std::fill(pr, pr + a8, 0.f);
    std::fill(pr + b8, pr + ld, 0.f);
    v8f vsum = splat(0.f);
    const v8f vshift = splat(shift);
    for (int j = a8; j < b8; j += 8) {
      const v8f s = load8(pr + j);
      const v8f e = s == splat(kNegInf) ? splat(0.f) : exp8(s - vshift);
      vsum += e;
      store8(pr + j, e);
    }
    if (forward) {
      sums[r] = hsum(vsum);
      lse_rows[r] = shift + std::log(sums[r]);
    }
  }
}

// k (or v) of one (batch row, kv head), [S, D] with row stride K*D, transposed into [D, S] and
// multiplied by `scale`.
void transpose_kv(const float* x, long ldx, int s, int dd, float scale, float* xt) {
  for (int j = 0; j < s; ++j)
    for (int c = 0; c < dd; ++c) xt[c * s + j] = scale * x[j * ldx + c];
}

// The shapes and mask inputs both handlers take first; false if the shapes do not fit.
bool problem_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                const ffi::Buffer<ffi::S32>& q_seg, const ffi::Buffer<ffi::S32>& kv_seg,
                const ffi::Buffer<ffi::S32>& q_pos, const ffi::Buffer<ffi::S32>& kv_pos,
                int32_t causal, Dims& dm, Masks& m) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || qd[3] != kd[3] || qd[0] != kd[0] || kd[2] == 0 ||
      qd[2] % kd[2] != 0)
    return false;
  dm = Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3]};
  m = Masks{q_seg.typed_data(), kv_seg.typed_data(), q_pos.typed_data(), kv_pos.typed_data(),
            causal != 0};
  return true;
}

constexpr char kShapeError[] = "attention: q [B, L, H, D], k/v [B, S, K, D], H % K == 0";

ffi::Error AttentionFwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg,
                            ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::S32> q_pos,
                            ffi::Buffer<ffi::S32> kv_pos, int32_t causal, float scale,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Dims dm;
  Masks m;
  if (!problem_of(q, k, q_seg, kv_seg, q_pos, kv_pos, causal, dm, m))
    return ffi::Error::InvalidArgument(kShapeError);
  const int64_t g = dm.h / dm.kh;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  const long ldq = dm.h * dm.d, ldkv = dm.kh * dm.d;
  parallel_for(pool, static_cast<int>(dm.b * dm.kh), [&](int task) {
    const int64_t bi = task / dm.kh, kh = task % dm.kh;
    Scratch& scratch = thread_scratch(dm);
    KeyRanges& ranges = scratch.ranges;
    ranges.compute(m, dm, bi);
    std::vector<float>&kt = scratch.kt, &p = scratch.p, &sums = scratch.sums;
    transpose_kv(kp + bi * dm.s * ldkv + kh * dm.d, ldkv, dm.s, dm.d, scale, kt.data());
    for (int64_t hi = kh * g; hi < (kh + 1) * g; ++hi) {
      for (int64_t i0 = 0, blk = 0; i0 < dm.l; i0 += kRows, ++blk) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, dm.l - i0));
        const int jlo = ranges.block_lo[blk], nj = ranges.block_hi[blk] - jlo;
        float* o_rows = op + (bi * dm.l + i0) * ldq + hi * dm.d;
        float* lse_rows = lp + (bi * dm.h + hi) * dm.l + i0;
        if (nj <= 0) {
          for (int r = 0; r < rows; ++r) {
            std::fill(o_rows + r * ldq, o_rows + r * ldq + dm.d, 0.f);
            lse_rows[r] = kNegInf;
          }
          continue;
        }
        scores_to_probs(qp + (bi * dm.l + i0) * ldq + hi * dm.d, ldq, kt.data(), dm.s, rows, nj,
                        static_cast<int>(dm.d), ranges, m, dm, bi, i0, jlo, p.data(), lse_rows,
                        sums.data(), true);
        gemm(rows, static_cast<int>(dm.d), nj, p.data(), round_up8(nj), 1,
             vp + (bi * dm.s + jlo) * ldkv + kh * dm.d, ldkv, o_rows, ldq, false);
        for (int r = 0; r < rows; ++r) {
          const float inv = 1.f / sums[r];
          for (int c = 0; c < dm.d; ++c) o_rows[r * ldq + c] *= inv;
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg,
                            ffi::Buffer<ffi::S32> kv_seg, ffi::Buffer<ffi::S32> q_pos,
                            ffi::Buffer<ffi::S32> kv_pos, ffi::Buffer<ffi::F32> out,
                            ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, int32_t causal,
                            float scale, ffi::ResultBuffer<ffi::F32> dq,
                            ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims dm;
  Masks m;
  if (!problem_of(q, k, q_seg, kv_seg, q_pos, kv_pos, causal, dm, m))
    return ffi::Error::InvalidArgument(kShapeError);
  const int64_t g = dm.h / dm.kh;
  const int dd = static_cast<int>(dm.d);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const long ldq = dm.h * dm.d, ldkv = dm.kh * dm.d;
  parallel_for(pool, static_cast<int>(dm.b * dm.kh), [&](int task) {
    const int64_t bi = task / dm.kh, kh = task % dm.kh;
    Scratch& scratch = thread_scratch(dm);
    KeyRanges& ranges = scratch.ranges;
    ranges.compute(m, dm, bi);
    std::vector<float>&kt = scratch.kt, &vt = scratch.vt, &p = scratch.p, &dp = scratch.dp;
    const float* k_bk = kp + bi * dm.s * ldkv + kh * dm.d;
    transpose_kv(k_bk, ldkv, dm.s, dd, scale, kt.data());
    transpose_kv(vp + bi * dm.s * ldkv + kh * dm.d, ldkv, dm.s, dd, 1.f, vt.data());
    float* dk_bk = dkp + bi * dm.s * ldkv + kh * dm.d;
    float* dv_bk = dvp + bi * dm.s * ldkv + kh * dm.d;
    for (int64_t j = 0; j < dm.s; ++j) {
      std::fill(dk_bk + j * ldkv, dk_bk + j * ldkv + dd, 0.f);
      std::fill(dv_bk + j * ldkv, dv_bk + j * ldkv + dd, 0.f);
    }
    for (int64_t hi = kh * g; hi < (kh + 1) * g; ++hi) {
      for (int64_t i0 = 0, blk = 0; i0 < dm.l; i0 += kRows, ++blk) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, dm.l - i0));
        const int jlo = ranges.block_lo[blk], nj = ranges.block_hi[blk] - jlo;
        const long row0 = (bi * dm.l + i0) * ldq + hi * dm.d;
        float* dq_rows = dqp + row0;
        if (nj <= 0) {
          for (int r = 0; r < rows; ++r) std::fill(dq_rows + r * ldq, dq_rows + r * ldq + dd, 0.f);
          continue;
        }
        float* lse_rows = const_cast<float*>(lp + (bi * dm.h + hi) * dm.l + i0);  // only read
        scores_to_probs(qp + row0, ldq, kt.data(), dm.s, rows, nj, dd, ranges, m, dm, bi, i0, jlo,
                        p.data(), lse_rows, nullptr, false);
        const int ld = round_up8(nj);
        // dV[jlo:] += P^T dO
        gemm(nj, dd, rows, p.data(), 1, ld, dop + row0, ldq, dv_bk + jlo * ldkv, ldkv, true);
        // dP = dO V^T, then dS = P (dP - rowsum(dO * O)) * scale
        gemm(rows, nj, dd, dop + row0, ldq, 1, vt.data() + jlo, dm.s, dp.data(), ld, false);
        for (int r = 0; r < rows; ++r) {
          const float* dor = dop + row0 + r * ldq;
          const float* orow = op + row0 + r * ldq;
          v8f vs = splat(0.f);
          int c = 0;
          for (; c + 8 <= dd; c += 8) vs += load8(dor + c) * load8(orow + c);
          float s = hsum(vs);
          for (; c < dd; ++c) s += dor[c] * orow[c];
          float* dpr = dp.data() + r * ld;
          const float* pr = p.data() + r * ld;
          const v8f vdelta = splat(s), vscale = splat(scale);
          for (int j = 0; j < ld; j += 8)
            store8(dpr + j, load8(pr + j) * (load8(dpr + j) - vdelta) * vscale);
        }
        // dQ = dS K, dK[jlo:] += dS^T Q
        gemm(rows, dd, nj, dp.data(), ld, 1, k_bk + jlo * ldkv, ldkv, dq_rows, ldq, false);
        gemm(nj, dd, rows, dp.data(), 1, ld, qp + row0, ldq, dk_bk + jlo * ldkv, ldkv, true);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// q, k, v, then the segment ids and positions of the queries and the keys: both handlers' first
// arguments.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PathwaysAttentionFwd, AttentionFwdImpl,
                              BindInputs()
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(PathwaysAttentionBwd, AttentionBwdImpl,
                              BindInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dout
                                  .Attr<int32_t>("causal")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
