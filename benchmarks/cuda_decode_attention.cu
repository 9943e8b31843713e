// Paged decode attention in CUDA C++ with deep cp.async pipelines: a probe kernel, not (yet) the
// engine's. Question it answers (docs/perf-notes.md, lead 1): can decode attention read ~100 GB/s
// per SM on a few SMs, so that it can run beside the GEMMs on SMs of its own? The engine's Triton
// kernel reads 38-48 GB/s per SM there, because each CTA waits on its own load -> dot -> softmax
// chain; here every warp streams its own ring of STAGES tiles, so STAGES - 1 tiles per warp are
// always in flight while it computes on the oldest.
//
// Same semantics as replica/kernels/paged_attention.py's split kernel, whose combine kernel merges
// the partials written here (same scratch layout, log2-domain max):
//   q [B, H, 128] (16-bit), k/v cache [num_blocks, KVH, 16, 128], block table [R, max_blocks] int32,
//   table_rows [B] int64, seq_lens [B] int64; work item (b, kvh, split s) owns tokens
//   [s * split, min((s + 1) * split, seq_len)); a row with seq_len <= split is written to `out`
//   normalised, other rows write fp32 partials po [B, H, num_splits, 128], pm / pl [B, H, num_splits].
// Layout limits of the probe: head_dim 128, block size 16 (one block = one tile of 16 tokens),
// GROUP = H / KVH <= 8 (the query heads of a KV head are the n = 8 columns of the MMAs).
//
// Work split: the grid is persistent; warp w of the launch (WARPS per CTA) walks items
// w, w + total_warps, ... in split-major order, and its ring crosses item boundaries without
// draining. Each warp works alone (no __syncthreads): one ring, one online softmax.
//
// Measured (session 17, docs/perf-notes.md): 76 GB/s per SM on 8 free SMs with 16 warps and no
// ring, 1.6x the Triton kernel; deeper rings and bulk copies read less. Not used by the engine.
//
// Compile-time knobs (-D): USE_HALF (fp16; bf16 without it), WARPS, STAGES, CTAS, BULK, EVICT_FIRST.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(USE_HALF)
#define DTYPE __half
#else
#define DTYPE __nv_bfloat16
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef STAGES
#define STAGES 3
#endif
#ifndef BULK
#define BULK 0            // 1: each lane copies one 256-byte row with a bulk copy (the TMA unit),
#endif                    // completion on an mbarrier per stage; 0: 16-byte cp.async, 8 per lane
#ifndef CTAS
#define CTAS 1            // CTAs per SM the registers must allow (ptxas caps them to fit)
#endif

constexpr int HD = 128;             // head dim
constexpr int BS = 16;              // tokens per KV block, and per tile
constexpr int ROW = HD + 8;         // smem row pitch in elements: 272 B keeps ldmatrix conflict-free
constexpr int TILE = BS * ROW;      // one K or V tile in smem (elements)
constexpr int KSTEPS = HD / 16;     // m16n8k16 steps over the head dim
constexpr int MTILES = HD / 16;     // m16 tiles of O^T (head dims)

struct Args {
  const DTYPE* q; const DTYPE* k; const DTYPE* v; const int32_t* bt; const int64_t* rows;
  const int64_t* lens; DTYPE* out; float* po; float* pm; float* pl; int32_t* smids;
  float qk_scale; int split, num_splits, batch, kv_heads, group;
  int64_t sqb, sqh, skb, skh, skn, svb, svh, svn, sbt, sob, soh;
};

__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if defined(USE_HALF)
  __half2 h = __floats2half2_rn(lo, hi);
#else
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
#endif
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  // c [4] += A [16 x 16] . B [16 x 8] (m16n8k16, fp32 accumulators)
#if defined(USE_HALF)
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
               "{%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p, bool trans) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  if (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

#ifndef EVICT_FIRST
#define EVICT_FIRST 0     // 1: the K/V stream is marked evict-first in L2 (keeps others' lines)
#endif

__device__ __forceinline__ uint64_t l2_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid, uint64_t policy) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
#if EVICT_FIRST
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(a),
               "l"(gmem), "r"(valid ? 16 : 0), "l"(policy));
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem),
               "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void bulk_row(void* smem, const void* gmem, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(smem_addr(smem)), "l"(gmem), "n"(HD * 2), "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t bar, uint32_t parity) {
  asm volatile("{\n .reg .pred P;\n WAIT_%=:\n"
               " mbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n"
               " @!P bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Where a warp is in its walk: one (row, kv head, split) item and a tile (block) inside it.
struct Cursor {
  int64_t item;
  int b, kvh, s, end, tile, tile_end;
};

// Move `c` to the first item at or after `item` (stepping by `stride`) that holds tokens.
__device__ __forceinline__ bool seek(Cursor& c, int64_t item, int64_t stride, int64_t total,
                                     const Args& a) {
  const int per_split = a.batch * a.kv_heads;
  for (; item < total; item += stride) {
    int s = static_cast<int>(item / per_split);
    int rem = static_cast<int>(item - static_cast<int64_t>(s) * per_split);
    int b = rem / a.kv_heads;
    int len = static_cast<int>(__ldg(a.lens + b));
    int start = s * a.split;
    if (start < len) {
      c.item = item; c.b = b; c.kvh = rem - b * a.kv_heads; c.s = s;
      c.end = min(start + a.split, len);
      c.tile = start / BS; c.tile_end = (c.end + BS - 1) / BS;
      return true;
    }
  }
  c.item = total;
  return false;
}

__device__ __forceinline__ bool advance(Cursor& c, int64_t stride, int64_t total, const Args& a) {
  if (++c.tile < c.tile_end) return true;
  return seek(c, c.item + stride, stride, total, a);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, CTAS) decode_attention(Args a) {
  extern __shared__ __align__(16) uint16_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;           // MMA fragment row (query head) and column pair
  const int64_t stride = static_cast<int64_t>(gridDim.x) * WARPS;
  const int64_t total = static_cast<int64_t>(a.batch) * a.kv_heads * a.num_splits;
  const int heads = a.kv_heads * a.group;
  DTYPE* ring = reinterpret_cast<DTYPE*>(smem) + static_cast<size_t>(warp) * STAGES * 2 * TILE;
#if BULK
  __shared__ __align__(8) uint64_t bars[WARPS][STAGES];   // one mbarrier per stage of each ring
  uint32_t parity = 0;                                      // bit s: the phase stage s waits for
  if (lane == 0)
    for (int i = 0; i < STAGES; ++i)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&bars[warp][i])));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncwarp();
#endif
  if (a.smids && threadIdx.x == 0) {
    uint32_t id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    a.smids[blockIdx.x] = static_cast<int32_t>(id);
  }

  // Producer: copy one tile (16 tokens of K and of V, 4 KB each) of cursor p into `stage`.
  // The block number comes from `tbl`, 32 table entries held one per lane and refilled every 32
  // tiles, so issuing a tile never waits on a global load.
  Cursor p{};
  int tbl = 0, tbl_base = 0;
  int64_t tbl_item = -1;
  auto refill = [&]() {
    const int32_t* table = a.bt + __ldg(a.rows + p.b) * a.sbt;
    tbl_base = p.tile;
    tbl_item = p.item;
    tbl = (p.tile + lane < p.tile_end) ? __ldg(table + p.tile + lane) : 0;
  };
  // A tile's 16 rows are contiguous (stride_kn == stride_vn == HD, checked on the host): lane l
  // copies 16-byte chunks (l / 16 + 2j, l % 16) for j < 8, so only the tile's base address varies.
  const int lrow = lane >> 4, lcol = (lane & 15) * 8;
  const uint64_t policy = EVICT_FIRST ? l2_policy() : 0;
  auto issue = [&](int stage) {
    if (p.item != tbl_item || p.tile - tbl_base >= 32) refill();
    const int64_t blk = __shfl_sync(0xffffffffu, tbl, p.tile - tbl_base);
#if BULK
    // lane l copies row l % 16 of K (l < 16) or V; a row past the item's end copies row 0 of the
    // block instead (finite data; its score is masked), so every stage expects the same bytes
    const uint32_t bar = smem_addr(&bars[warp][stage]);
    if (lane == 0) bar_expect(bar, 2 * BS * HD * 2);
    __syncwarp();
    const int r = lane & 15, src_row = p.tile * BS + r < p.end ? r : 0;
    const DTYPE* src = (lane < 16 ? a.k : a.v) + blk * a.skb + p.kvh * a.skh + src_row * HD;
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // after this warp's reads
    bulk_row(ring + stage * 2 * TILE + (lane >> 4) * TILE + r * ROW, src, bar);
#else
    const int64_t off = blk * a.skb + p.kvh * a.skh + lrow * HD + lcol;   // V has K's strides
    const DTYPE* ks = a.k + off;
    const DTYPE* vs = a.v + off;
    DTYPE* kd = ring + stage * 2 * TILE + lrow * ROW + lcol;
    const int rows_left = p.end - p.tile * BS;      // rows past the item's end are zero-filled
    if (rows_left >= BS) {
#pragma unroll
      for (int j = 0; j < BS / 2; ++j) {
        cp_async16(kd + 2 * j * ROW, ks + 2 * j * HD, true, policy);
        cp_async16(kd + TILE + 2 * j * ROW, vs + 2 * j * HD, true, policy);
      }
    } else {
#pragma unroll
      for (int j = 0; j < BS / 2; ++j) {
        const bool valid = lrow + 2 * j < rows_left;
        cp_async16(kd + 2 * j * ROW, ks + 2 * j * HD, valid, policy);
        cp_async16(kd + TILE + 2 * j * ROW, vs + 2 * j * HD, valid, policy);
      }
    }
#endif
  };

  Cursor c;
  bool more = seek(c, blockIdx.x * WARPS + warp, stride, total, a);
  p = c;
  bool pmore = more;
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (pmore) { issue(i); pmore = advance(p, stride, total, a); }
    cp_async_commit();
  }

  // Transposed products, so that the GROUP <= 8 query heads are the MMA's n = 8 columns and no
  // tensor work is spent on padding rows: S^T [16 keys x 8 heads] = K [16 x 128] . Q^T, then
  // O^T [128 x 8] += V^T [128 x 16 keys] . P^T. Lane (g, t) holds, in MMA C layout, keys (or head
  // dims) g and g + 8 of heads 2t and 2t + 1.
  uint32_t qb[KSTEPS][2];            // B fragments of Q^T: head g, dims 2t, 2t+1 / 2t+8, 2t+9
  float acc[MTILES][4];              // O^T: [m][0] (dim 16m+g, head 2t), [1] (16m+g, 2t+1), [2]/[3] dim +8
  float m_i[2], l_i[2];              // heads 2t, 2t+1: running max (log2 domain), this lane's sum share
  int64_t q_item = -1;
  int stage = 0, pstage = STAGES - 1;
  // ldmatrix x4 lane -> row/column of a 16 x 16 A tile: K as is (rows = keys), V transposed (rows
  // of the stored tile = keys, so lanes 16-31 take keys 8-15)
  const int krow = (lane & 7) + ((lane >> 3) & 1) * 8, kcol = (lane >> 4) * 8;
  const int vrow = (lane & 7) + (lane >> 4) * 8, vcol = ((lane >> 3) & 1) * 8;
  while (more) {
    if (c.item != q_item) {          // first tile of an item: load q, reset the softmax
      q_item = c.item;
      const bool live = g < a.group;
      const DTYPE* qp = a.q + c.b * a.sqb + (c.kvh * a.group + (live ? g : 0)) * a.sqh;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        qb[ks][0] = live ? __ldg(reinterpret_cast<const uint32_t*>(qp + ks * 16 + 2 * t)) : 0u;
        qb[ks][1] = live ? __ldg(reinterpret_cast<const uint32_t*>(qp + ks * 16 + 8 + 2 * t)) : 0u;
      }
#pragma unroll
      for (int m = 0; m < MTILES; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.f;
      m_i[0] = m_i[1] = -INFINITY;
      l_i[0] = l_i[1] = 0.f;
    }
    if (pmore) { issue(pstage); pmore = advance(p, stride, total, a); }
#if BULK
    bar_wait(smem_addr(&bars[warp][stage]), (parity >> stage) & 1);   // the oldest tile landed
    parity ^= 1u << stage;
    __syncwarp();
#else
    cp_async_commit();
    cp_async_wait();                 // this warp's oldest tile has landed
    __syncwarp();
#endif

    const DTYPE* kt = ring + stage * 2 * TILE;
    const DTYPE* vt = kt + TILE;
    float st[2][4] = {};             // S^T over even / odd head-dim steps: two independent chains
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      uint32_t ka[4];
      ldmatrix_x4(ka, kt + krow * ROW + ks * 16 + kcol, false);
      mma16816(st[ks & 1], ka, qb[ks][0], qb[ks][1]);
    }
    // online softmax per head over this lane's keys g and g + 8, then across the 8 lanes of a t
    const int key = c.tile * BS + g;
    const bool lo_ok = key < c.end, hi_ok = key + 8 < c.end;
    float x[4];                      // (key g, head 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = (st[0][i] + st[1][i]) * a.qk_scale;
    x[0] = lo_ok ? x[0] : -INFINITY;
    x[1] = lo_ok ? x[1] : -INFINITY;
    x[2] = hi_ok ? x[2] : -INFINITY;
    x[3] = hi_ok ? x[3] : -INFINITY;
    float mx[2] = {fmaxf(x[0], x[2]), fmaxf(x[1], x[3])};
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], o));
    const float m_new[2] = {fmaxf(m_i[0], mx[0]), fmaxf(m_i[1], mx[1])};   // finite: >= 1 valid key
    float pr[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) pr[i] = fast_exp2(x[i] - m_new[i & 1]);
    if (__any_sync(0xffffffffu, m_new[0] != m_i[0] || m_new[1] != m_i[1])) {   // a max grew
      const float al[2] = {fast_exp2(m_i[0] - m_new[0]), fast_exp2(m_i[1] - m_new[1])};
#pragma unroll
      for (int m = 0; m < MTILES; ++m)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][i] *= al[i & 1];
      l_i[0] *= al[0];
      l_i[1] *= al[1];
      m_i[0] = m_new[0];
      m_i[1] = m_new[1];
    }
    l_i[0] += pr[0] + pr[2];
    l_i[1] += pr[1] + pr[3];
    // P^T as the B operand: this lane holds P[key g (+8)][heads 2t, 2t+1], B wants P[keys 2t, 2t+1]
    // [head g]: an 8 x 8 transpose of each half, in registers
    const uint32_t pb0 = movmatrix_trans(pack2(pr[0], pr[1]));
    const uint32_t pb1 = movmatrix_trans(pack2(pr[2], pr[3]));
#pragma unroll
    for (int m = 0; m < MTILES; ++m) {
      uint32_t va[4];
      ldmatrix_x4(va, vt + vrow * ROW + m * 16 + vcol, true);
      mma16816(acc[m], va, pb0, pb1);
    }
    __syncwarp();                    // every lane is done with `stage` before it is refilled
    stage = stage + 1 == STAGES ? 0 : stage + 1;
    pstage = pstage + 1 == STAGES ? 0 : pstage + 1;

    if (c.tile + 1 == c.tile_end) {  // last tile of the item: write heads 2t, 2t+1 out
      float l[2] = {l_i[0], l_i[1]};
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) l[h] += __shfl_xor_sync(0xffffffffu, l[h], o);
      const int len = static_cast<int>(__ldg(a.lens + c.b));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (2 * t + h >= a.group) continue;
        const int head = c.kvh * a.group + 2 * t + h;
        if (len <= a.split) {
          DTYPE* o = a.out + c.b * a.sob + head * a.soh + g;
          const float inv = 1.f / l[h];
#pragma unroll
          for (int m = 0; m < MTILES; ++m) {
            o[m * 16] = static_cast<DTYPE>(acc[m][h] * inv);
            o[m * 16 + 8] = static_cast<DTYPE>(acc[m][2 + h] * inv);
          }
        } else {
          const int64_t idx = (static_cast<int64_t>(c.b) * heads + head) * a.num_splits + c.s;
          float* o = a.po + idx * HD + g;
#pragma unroll
          for (int m = 0; m < MTILES; ++m) {
            o[m * 16] = acc[m][h];
            o[m * 16 + 8] = acc[m][2 + h];
          }
          if (g == 0) { a.pm[idx] = m_i[h]; a.pl[idx] = l[h]; }
        }
      }
    }
    more = advance(c, stride, total, a);
  }
  asm volatile("cp.async.wait_all;\n" ::);
}
