// Prototype: a fused causal, document-masked attention forward for XLA:CPU through the XLA FFI.
//
// Why (issue 11): at the peer shape the pure-JAX blocked core runs at ~40 GFLOP/s, a tenth of the
// machine's matmul rate, in a tail of small ops. This kernel keeps one (row, head)'s scores in cache
// and does the two matmuls, the mask and the softmax in one pass, so bench/bench_native_attention.py
// can measure how much a native core would buy before it is built into loopjax/model.
//
// Layouts: q [B, S, N, H], k and v [B, S, K, H] float32, segment ids [B, S] int32; out [B, S, N, H]
// and the rows' logsumexp [B, N, S]. Work items are (b, n) pairs, spread over XLA's intra-op pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int V = 16;
constexpr int R = 8;
#else
constexpr int V = 8;
constexpr int R = 4;
#endif
typedef float vf __attribute__((vector_size(V * 4)));
typedef int32_t vi __attribute__((vector_size(V * 4)));
constexpr int TILE = 2 * V;  // columns of one register tile
constexpr int QB = 64;       // query rows per block (a multiple of R)

inline vf load(const float* p) { vf x; std::memcpy(&x, p, sizeof(vf)); return x; }
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
inline vf splat(float a) { return vf{} + a; }

// exp, Cephes-style: 2^n * p(r), r = x - n ln2; exactly 0 below -87.3 (so -inf, masked, gives 0).
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.3f);
  vi under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale; std::memcpy(&scale, &bits, sizeof(vf));
  vf y = p * scale;
  return under ? splat(0.0f) : y;
}

// c[r][0:TILE] (+)= sum_h a[r][h] * bt[h][0:TILE]   (a: R rows of stride lda; bt: rows of stride ldb)
inline void tile_abt(const float* a, int lda, const float* bt, int ldb, int depth, float* c, int ldc) {
  vf acc[R][2] = {};
  for (int h = 0; h < depth; ++h) {
    vf b0 = load(bt + h * ldb), b1 = load(bt + h * ldb + V);
    for (int r = 0; r < R; ++r) {
      vf av = splat(a[r * lda + h]);
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
  for (int r = 0; r < R; ++r) { store(c + r * ldc, acc[r][0]); store(c + r * ldc + V, acc[r][1]); }
}

// c[r][0:TILE] += sum_j a[r][j] * b[j][0:TILE]
inline void tile_ab_acc(const float* a, int lda, const float* b, int ldb, int depth, float* c, int ldc) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) { acc[r][0] = load(c + r * ldc); acc[r][1] = load(c + r * ldc + V); }
  for (int j = 0; j < depth; ++j) {
    vf b0 = load(b + j * ldb), b1 = load(b + j * ldb + V);
    for (int r = 0; r < R; ++r) {
      vf av = splat(a[r * lda + j]);
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
  for (int r = 0; r < R; ++r) { store(c + r * ldc, acc[r][0]); store(c + r * ldc + V, acc[r][1]); }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Runs work(i) for i in [0, total) on the pool and the calling thread; returns when all are done.
void parallel_for(ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> work) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t total;
    std::function<void(int64_t)> work;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->total = total;
  state->work = std::move(work);
  auto drain = [](const std::shared_ptr<State>& s) {
    for (int64_t i; (i = s->next.fetch_add(1)) < s->total;) {
      s->work(i);
      if (s->done.fetch_add(1) + 1 == s->total) { std::lock_guard<std::mutex> l(s->mu); s->cv.notify_all(); }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state, drain] { drain(state); });
  drain(state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->total; });
}

struct Dims { int64_t B, S, N, K, H; };

// One (b, n): all query blocks, each against its keys (in chunks from the diagonal down, so every
// row's running max is finite after the first chunk), online softmax.
void forward_item(const Dims& d, const float* q, const float* k, const float* v, const int32_t* seg,
                  float* out, float* lse, int64_t b, int64_t n) {
  const int S = d.S, H = d.H, Hp = round_up(H, TILE), Sp = round_up(S, TILE);
  const int64_t kh = n / (d.N / d.K);
  const float scale = 1.0f / std::sqrt(float(H));
  std::vector<float> kt(size_t(Hp) * Sp, 0.f), vp(size_t(Sp) * Hp, 0.f);
  std::vector<float> qs(size_t(QB) * Hp), sc(size_t(QB) * Sp), o(size_t(QB) * Hp);
  std::vector<int32_t> sg(Sp, -1);
  for (int s = 0; s < S; ++s) {
    const float* ks = k + ((b * S + s) * d.K + kh) * H;
    const float* vs = v + ((b * S + s) * d.K + kh) * H;
    for (int h = 0; h < H; ++h) { kt[size_t(h) * Sp + s] = ks[h]; vp[size_t(s) * Hp + h] = vs[h]; }
    sg[s] = seg[b * S + s];
  }
  float m[QB], l[QB];
  for (int i0 = 0; i0 < S; i0 += QB) {
    const int rows = std::min(QB, S - i0), rows_p = round_up(rows, R);
    std::fill(qs.begin(), qs.end(), 0.f);
    std::fill(o.begin(), o.end(), 0.f);
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + ((b * S + i0 + r) * d.N + n) * H;
      for (int h = 0; h < H; ++h) qs[size_t(r) * Hp + h] = qr[h] * scale;
    }
    const int kend = round_up(i0 + rows, TILE);  // keys [0, kend): the causal reach, tile-padded
    // Scores of the whole reach at once (QB x kend floats: 64 KiB at S 256), then exact softmax.
    for (int r0 = 0; r0 < rows_p; r0 += R)
      for (int c0 = 0; c0 < kend; c0 += TILE)
        tile_abt(&qs[size_t(r0) * Hp], Hp, &kt[c0], Sp, H, &sc[size_t(r0) * Sp + c0], Sp);
    for (int r = 0; r < rows_p; ++r) {
      float* row = &sc[size_t(r) * Sp];
      const int p = i0 + r;
      const int32_t sp = r < rows ? sg[p] : -2;
      vf mx = splat(-INFINITY);
      for (int c0 = 0; c0 < kend; c0 += V) {
        vf x = load(row + c0);
        vi pos = vi{} + c0;
        for (int t = 0; t < V; ++t) pos[t] += t;
        vi segs; std::memcpy(&segs, &sg[c0], sizeof(vi));
        vi ok = (pos <= p) & (segs == sp);
        x = ok ? x : splat(-INFINITY);
        store(row + c0, x);
        mx = mx > x ? mx : x;
      }
      float mrow = -INFINITY;
      for (int t = 0; t < V; ++t) mrow = std::max(mrow, mx[t]);
      if (r >= rows) mrow = 0.f;  // padding rows: all masked, keep them finite (they are not written)
      vf sum = {};
      for (int c0 = 0; c0 < kend; c0 += V) {
        vf e = vexp(load(row + c0) - mrow);
        store(row + c0, e);
        sum += e;
      }
      float lrow = 0.f;
      for (int t = 0; t < V; ++t) lrow += sum[t];
      m[r] = mrow;
      l[r] = lrow;
    }
    for (int r0 = 0; r0 < rows_p; r0 += R)
      for (int h0 = 0; h0 < Hp; h0 += TILE)
        tile_ab_acc(&sc[size_t(r0) * Sp], Sp, &vp[h0], Hp, kend, &o[size_t(r0) * Hp + h0], Hp);
    for (int r = 0; r < rows; ++r) {
      float* dst = out + ((b * S + i0 + r) * d.N + n) * H;
      const float inv = 1.0f / l[r];
      for (int h = 0; h < H; ++h) dst[h] = o[size_t(r) * Hp + h] * inv;
      lse[(b * d.N + n) * S + i0 + r] = m[r] + std::log(l[r]);
    }
  }
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("q, k, v must be [B, S, heads, H]");
  Dims d{qd[0], qd[1], qd[2], kd[2], qd[3]};
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* sp = seg.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, d.B * d.N, [&](int64_t item) {
    forward_item(d, qp, kp, vp, sp, op, lp, item / d.N, item % d.N);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopjaxAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
