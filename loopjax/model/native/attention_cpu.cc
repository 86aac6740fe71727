// Causal, document-masked attention for XLA:CPU through the XLA FFI: forward and backward.
//
// Why (issue 11): on CPU the pure-JAX blocked core runs at a tenth of the machine's matmul rate, in a
// tail of small ops between its block matmuls. Here one work item keeps a (row, head)'s keys, values
// and the scores of a query block's whole causal reach in cache, and does the matmuls, the mask and
// an exact (not online) softmax in one pass. loopjax/model/native_attention.py builds this file on
// first use (g++ -O3 -march=native) and wraps it in a custom VJP.
//
// Math (s = (q / sqrt(H)) k^T over allowed pairs, allowed = causal and same segment id):
//   forward   p = exp(s - lse), lse = log sum exp(s) per row;  out = p v
//   backward  delta = rowsum(dout * out);  dp = dout v^T;  ds = p (dp - delta)
//             dq = ds k / sqrt(H);  dk = ds^T (q / sqrt(H));  dv = p^T dout
// Masked scores are -inf and exp(-inf) is exactly 0, so they add nothing anywhere. Every row allows
// its own position, so no row is empty. A query block visits keys from the first position of the
// earliest document its rows belong to (not from 0) up to its diagonal.
//
// The queries may be a part of the sequence the keys cover (context parallelism: one device's query
// chunk against the gathered keys): P equal pieces, contiguous in the sequence, piece p starting at
// position starts[p]. Positions (masking, reach, diagonals) are the keys' indices; rows index q.
//
// Layouts: q [B, Sq, N, H], k and v [B, S, K, H] float32, segment ids [B, S] int32 (of the keys'
// positions), starts [P] int32 (N a multiple of K: grouped-query heads share kv head n / (N / K));
// out [B, Sq, N, H], lse [B, N, Sq]. Forward work items are (b, n); backward items are (b, kv head) so
// that dk and dv of the G query heads sum without races.
// Items run on XLA's intra-op pool and the calling thread. Each item sums in a fixed order, so the
// results do not depend on the thread count or schedule (bitwise-repeatable runs).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int V = 16;  // floats per vector register
constexpr int R = 8;   // rows of a register tile: R x 2 accumulators + 2 loads fit the 32 registers
#else
constexpr int V = 8;
constexpr int R = 4;
#endif
typedef float vf __attribute__((vector_size(V * 4)));
typedef int32_t vi __attribute__((vector_size(V * 4)));
constexpr int TILE = 2 * V;  // columns of one register tile
constexpr int QB = 64;       // query rows per block (a multiple of R): QB x reach scores stay in cache

inline vf load(const float* p) { vf x; std::memcpy(&x, p, sizeof(vf)); return x; }
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
inline vf splat(float a) { return vf{} + a; }
inline float hsum(vf x) { float s = 0.f; for (int t = 0; t < V; ++t) s += x[t]; return s; }
inline float hmax(vf x) { float m = -INFINITY; for (int t = 0; t < V; ++t) m = std::max(m, x[t]); return m; }
inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// exp, Cephes-style: 2^n * p(r), r = x - n ln2, |error| ~1 ulp; exactly 0 below -87.3 (so -inf gives 0).
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.3f);
  vi under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
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

// One register tile: c[r][0:TILE] (+)= sum_j A(r, j) * b[j][0:TILE] for r < R, where A(r, j) is
// a[r * lda + j], or a[j * lda + r] when A_TRANSPOSED (a product with a^T without transposing it).
template <bool ACCUMULATE, bool A_TRANSPOSED>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, int depth, float* c, int64_t ldc) {
  vf acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = ACCUMULATE ? load(c + r * ldc) : vf{};
    acc[r][1] = ACCUMULATE ? load(c + r * ldc + V) : vf{};
  }
  for (int j = 0; j < depth; ++j) {
    vf b0 = load(b + j * ldb), b1 = load(b + j * ldb + V);
    for (int r = 0; r < R; ++r) {
      vf av = splat(A_TRANSPOSED ? a[j * lda + r] : a[r * lda + j]);
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
  for (int r = 0; r < R; ++r) { store(c + r * ldc, acc[r][0]); store(c + r * ldc + V, acc[r][1]); }
}

// Runs work(i) for i in [0, total) on the pool and the calling thread; returns when all are done. The
// caller drains items too, so this finishes even when every pool thread is busy elsewhere.
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

struct Dims {
  int64_t B, Sq, S, N, K, H;  // Sq query rows, S key positions
  int64_t P;                  // query pieces, each Sq / P rows
  const int32_t* starts;      // [P]: the position of each piece's first row
  int Hp() const { return round_up(int(H), TILE); }
  int Sp() const { return round_up(int(S), TILE); }
  int64_t piece() const { return Sq / P; }
};

// One row's keys and values, padded to tiles, in the layouts a pass needs: transposed ([Hp, Sp],
// columns are positions) for the products with q and dout, row-major ([Sp, Hp]) for the products with
// p and ds. (Laying out all four costs a fifth of a forward item at S 256, H 32.)
enum Layouts { K_HS = 1, V_HS = 2, K_SH = 4, V_SH = 8 };

struct KeyValues {
  std::vector<float> k_HS, v_HS, k_SH, v_SH;
  std::vector<int32_t> segment;  // [Sp], -1 past the sequence (never compared: causality excludes it)
  std::vector<int> first;        // [S]: the first position of each position's segment id

  KeyValues(const Dims& d, const float* k, const float* v, const int32_t* seg, int64_t b, int64_t kh, int layouts)
      : segment(d.Sp(), -1), first(d.S) {
    const int S = d.S, H = d.H, Hp = d.Hp(), Sp = d.Sp();
    const size_t size = size_t(Hp) * Sp;
    for (auto [flag, x] : {std::pair{K_HS, &k_HS}, {V_HS, &v_HS}, {K_SH, &k_SH}, {V_SH, &v_SH}})
      if (layouts & flag) x->assign(size, 0.f);
    for (int s = 0; s < S; ++s) {
      const float* ks = k + ((b * S + s) * d.K + kh) * H;
      const float* vs = v + ((b * S + s) * d.K + kh) * H;
      if (layouts & K_HS) for (int h = 0; h < H; ++h) k_HS[size_t(h) * Sp + s] = ks[h];
      if (layouts & V_HS) for (int h = 0; h < H; ++h) v_HS[size_t(h) * Sp + s] = vs[h];
      if (layouts & K_SH) std::memcpy(&k_SH[size_t(s) * Hp], ks, H * sizeof(float));
      if (layouts & V_SH) std::memcpy(&v_SH[size_t(s) * Hp], vs, H * sizeof(float));
    }
    std::unordered_map<int32_t, int> first_of;
    for (int s = 0; s < S; ++s) {
      segment[s] = seg[b * S + s];
      first[s] = first_of.emplace(segment[s], s).first->second;
    }
  }

  // Keys [start, end) that query rows [i0, i0 + rows) can see, tile-aligned.
  std::pair<int, int> reach(int i0, int rows) const {
    int start = *std::min_element(first.begin() + i0, first.begin() + i0 + rows);
    return {start / TILE * TILE, round_up(i0 + rows, TILE)};
  }
};

// The end of the keys that register rows [r0, r0 + R) of a block at i0 compute: their diagonal, tile
// aligned (so the upper triangle of the diagonal block is mostly skipped, not computed and masked).
inline int group_end(int i0, int r0, int end) { return std::min(end, round_up(i0 + r0 + R, TILE)); }

// s[0:rows_p, start:group_end) = a[0:rows_p, 0:depth] b_HS[0:depth, start:group_end), by register rows.
void scores(const float* a, int lda, const float* b_HS, int ldb, int depth, int i0, int rows_p, int start, int end,
            float* s, int lds) {
  for (int r0 = 0; r0 < rows_p; r0 += R)
    for (int c0 = start, e = group_end(i0, r0, end); c0 < e; c0 += TILE)
      tile<false, false>(a + r0 * lda, lda, b_HS + c0, ldb, depth, s + r0 * lds + c0, lds);
}

// c[0:rows_p, 0:Hp] = p[0:rows_p, start:group_end) x_SH[start:group_end, 0:Hp]: p v, ds k.
void times_keys(const float* p, int ldp, const float* x_SH, int Hp, int i0, int rows_p, int start, int end, float* c) {
  for (int r0 = 0; r0 < rows_p; r0 += R)
    for (int h0 = 0; h0 < Hp; h0 += TILE)
      tile<false, false>(p + r0 * ldp + start, ldp, x_SH + size_t(start) * Hp + h0, Hp, group_end(i0, r0, end) - start,
                         c + r0 * Hp + h0, Hp);
}

// c_SH[start:end, 0:Hp] += p^T x: dv += p^T dout, dk += ds^T q. Key rows [c0, c0 + R) meet only the
// query rows at or after them (the others are causally masked and, past their group_end, not computed).
void keys_times(const float* p, int ldp, const float* x, int Hp, int i0, int rows_p, int start, int end, float* c_SH) {
  for (int c0 = start; c0 < end; c0 += R) {
    const int j0 = std::max(0, c0 - i0);
    if (j0 >= rows_p) break;
    for (int h0 = 0; h0 < Hp; h0 += TILE)
      tile<true, true>(p + size_t(j0) * ldp + c0, ldp, x + j0 * Hp + h0, Hp, rows_p - j0, c_SH + size_t(c0) * Hp + h0, Hp);
  }
}

// Masks (to -inf) and exponentiates one block of scores in place, each row over [start, its group_end):
// p = exp(s - offset), where offset is the row's max (forward, written to `offset`) or its logsumexp
// (backward, given); `sums` gets each row's sum of p. Rows past `rows` (tile padding) become zeros.
void mask_and_exp(const KeyValues& kv, int i0, int rows, int rows_p, int start, int end, float* s, int64_t lds,
                  float* offset, bool offset_is_max, float* sums) {
  for (int r = 0; r < rows_p; ++r) {
    float* row = s + r * lds;
    const int row_end = group_end(i0, r / R * R, end);
    if (r >= rows) {
      std::fill(row + start, row + row_end, 0.f);
      continue;
    }
    const int p = i0 + r;
    const int32_t sp = kv.segment[p];
    vf mx = splat(-INFINITY);
    for (int c0 = start; c0 < row_end; c0 += V) {
      vi pos = vi{} + c0;
      for (int t = 0; t < V; ++t) pos[t] += t;
      vi segs; std::memcpy(&segs, &kv.segment[c0], sizeof(vi));
      vf x = load(row + c0);
      x = ((pos <= p) & (segs == sp)) ? x : splat(-INFINITY);
      store(row + c0, x);
      mx = mx > x ? mx : x;
    }
    if (offset_is_max) offset[r] = hmax(mx);
    vf sum = {};
    for (int c0 = start; c0 < row_end; c0 += V) {
      vf e = vexp(load(row + c0) - offset[r]);
      store(row + c0, e);
      sum += e;
    }
    sums[r] = hsum(sum);
  }
}

// Query rows [row0, row0 + rows) of head n, scaled by 1/sqrt(H), into a [QB, Hp] block (zero padded).
void load_rows(const Dims& d, const float* x, int64_t b, int64_t n, int64_t row0, int rows, float factor,
               float* block) {
  const int Hp = d.Hp();
  std::fill(block, block + QB * Hp, 0.f);
  for (int r = 0; r < rows; ++r) {
    const float* src = x + ((b * d.Sq + row0 + r) * d.N + n) * d.H;
    for (int h = 0; h < d.H; ++h) block[r * Hp + h] = src[h] * factor;
  }
}

// Calls f(row0, i0, rows) for each query block of every piece: row0 its first row in q, i0 that row's
// position, rows <= QB.
template <typename F>
void query_blocks(const Dims& d, F f) {
  for (int64_t p = 0; p < d.P; ++p)
    for (int64_t i = 0; i < d.piece(); i += QB)
      f(p * d.piece() + i, int(d.starts[p] + i), int(std::min<int64_t>(QB, d.piece() - i)));
}

void forward_item(const Dims& d, const float* q, const float* k, const float* v, const int32_t* seg, float* out,
                  float* lse, int64_t b, int64_t n) {
  const int H = d.H, Hp = d.Hp(), Sp = d.Sp();
  const KeyValues kv(d, k, v, seg, b, n / (d.N / d.K), K_HS | V_SH);
  const float scale = 1.0f / std::sqrt(float(H));
  std::vector<float> qs(size_t(QB) * Hp), s(size_t(QB) * Sp), o(size_t(QB) * Hp);
  float m[QB], l[QB];
  query_blocks(d, [&](int64_t row0, int i0, int rows) {
    const int rows_p = round_up(rows, R);
    const auto [start, end] = kv.reach(i0, rows);
    load_rows(d, q, b, n, row0, rows, scale, qs.data());
    scores(qs.data(), Hp, kv.k_HS.data(), Sp, H, i0, rows_p, start, end, s.data(), Sp);
    mask_and_exp(kv, i0, rows, rows_p, start, end, s.data(), Sp, m, true, l);
    times_keys(s.data(), Sp, kv.v_SH.data(), Hp, i0, rows_p, start, end, o.data());
    for (int r = 0; r < rows; ++r) {
      float* dst = out + ((b * d.Sq + row0 + r) * d.N + n) * H;
      const float inv = 1.0f / l[r];
      for (int h = 0; h < H; ++h) dst[h] = o[size_t(r) * Hp + h] * inv;
      lse[(b * d.N + n) * d.Sq + row0 + r] = m[r] + std::log(l[r]);
    }
  });
}

void backward_item(const Dims& d, const float* q, const float* k, const float* v, const int32_t* seg,
                   const float* out, const float* lse, const float* dout, float* dq, float* dk, float* dv,
                   int64_t b, int64_t kh) {
  const int S = d.S, H = d.H, Hp = d.Hp(), Sp = d.Sp();
  const int64_t G = d.N / d.K;
  const KeyValues kv(d, k, v, seg, b, kh, K_HS | V_HS | K_SH);
  const float scale = 1.0f / std::sqrt(float(H));
  std::vector<float> qs(size_t(QB) * Hp), os(size_t(QB) * Hp), dos(size_t(QB) * Hp), dqs(size_t(QB) * Hp);
  std::vector<float> p(size_t(QB) * Sp), ds(size_t(QB) * Sp);
  std::vector<float> dk_SH(size_t(Sp) * Hp, 0.f), dv_SH(size_t(Sp) * Hp, 0.f);
  float row_lse[QB], sums[QB];
  for (int64_t n = kh * G; n < (kh + 1) * G; ++n) {
    query_blocks(d, [&](int64_t row0, int i0, int rows) {
      const int rows_p = round_up(rows, R);
      const auto [start, end] = kv.reach(i0, rows);
      load_rows(d, q, b, n, row0, rows, scale, qs.data());
      load_rows(d, out, b, n, row0, rows, 1.0f, os.data());
      load_rows(d, dout, b, n, row0, rows, 1.0f, dos.data());
      for (int r = 0; r < rows; ++r) row_lse[r] = lse[(b * d.N + n) * d.Sq + row0 + r];
      scores(qs.data(), Hp, kv.k_HS.data(), Sp, H, i0, rows_p, start, end, p.data(), Sp);
      mask_and_exp(kv, i0, rows, rows_p, start, end, p.data(), Sp, row_lse, false, sums);
      scores(dos.data(), Hp, kv.v_HS.data(), Sp, H, i0, rows_p, start, end, ds.data(), Sp);  // dp = dout v^T
      for (int r = 0; r < rows_p; ++r) {
        vf delta = {};
        for (int h0 = 0; h0 < Hp; h0 += V) delta += load(&dos[r * Hp + h0]) * load(&os[r * Hp + h0]);
        const float dr = hsum(delta);
        float *pr = &p[size_t(r) * Sp], *dsr = &ds[size_t(r) * Sp];
        for (int c0 = start, e = group_end(i0, r / R * R, end); c0 < e; c0 += V)
          store(dsr + c0, load(pr + c0) * (load(dsr + c0) - dr));
      }
      times_keys(ds.data(), Sp, kv.k_SH.data(), Hp, i0, rows_p, start, end, dqs.data());
      keys_times(p.data(), Sp, dos.data(), Hp, i0, rows_p, start, end, dv_SH.data());
      keys_times(ds.data(), Sp, qs.data(), Hp, i0, rows_p, start, end, dk_SH.data());
      for (int r = 0; r < rows; ++r) {
        float* dst = dq + ((b * d.Sq + row0 + r) * d.N + n) * H;
        for (int h = 0; h < H; ++h) dst[h] = dqs[size_t(r) * Hp + h] * scale;
      }
    });
  }
  for (int s = 0; s < S; ++s) {
    std::memcpy(dk + ((b * S + s) * d.K + kh) * H, &dk_SH[size_t(s) * Hp], H * sizeof(float));
    std::memcpy(dv + ((b * S + s) * d.K + kh) * H, &dv_SH[size_t(s) * Hp], H * sizeof(float));
  }
}

ffi::Error check_dims(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::S32>& starts, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions(), sd = starts.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("q, k, v must be [B, S, heads, H]");
  if (sd.size() != 1 || sd[0] < 1 || qd[1] % sd[0]) return ffi::Error::InvalidArgument("starts must be [P], P | Sq");
  *d = Dims{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], sd[0], starts.typed_data()};
  if (kd[0] != d->B || kd[3] != d->H || d->N % d->K)
    return ffi::Error::InvalidArgument("k, v must be [B, S, K, H] with K dividing q's heads");
  for (int64_t p = 0; p < d->P; ++p)
    if (d->starts[p] < 0 || d->starts[p] + d->piece() > d->S)
      return ffi::Error::InvalidArgument("a query piece lies outside the keys' positions");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> starts, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Dims d;
  if (ffi::Error e = check_dims(q, k, starts, &d); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* sp = seg.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, d.B * d.N, [&](int64_t item) { forward_item(d, qp, kp, vp, sp, op, lp, item / d.N, item % d.N); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::S32> starts, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Dims d;
  if (ffi::Error e = check_dims(q, k, starts, &d); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data();
  const float *lp = lse.typed_data(), *dop = dout.typed_data();
  const int32_t* sp = seg.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, d.B * d.K, [&](int64_t item) {
    backward_item(d, qp, kp, vp, sp, op, lp, dop, dqp, dkp, dvp, item / d.K, item % d.K);
  });
  return ffi::Error::Success();
}

// The arguments both passes take first: the pool, then q, k, v, the segment ids and the pieces' starts.
auto bind_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()   // q
      .Arg<ffi::Buffer<ffi::F32>>()   // k
      .Arg<ffi::Buffer<ffi::F32>>()   // v
      .Arg<ffi::Buffer<ffi::S32>>()   // segment ids
      .Arg<ffi::Buffer<ffi::S32>>();  // starts
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopjaxAttentionForward, Forward,
                              bind_inputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(LoopjaxAttentionBackward, Backward,
                              bind_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
