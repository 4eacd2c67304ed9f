// Fused Tucker-2 convolution for CUDA GPUs, float32, NCHW:
//   y = relu?(V * core_K(U * x) + bias + residual?)
// with U (R1, C) and V (CO, R2) 1x1 factors and K (R2, R1, KH, KW) the core.
//
// The shape is fixed at compile time: slimtorch.decompose.cuda_kernel prepends the #defines
// below (channels, ranks, kernel, stride, padding, dilation, map sizes, tile, epilogue) and
// compiles this file with NVRTC once per shape, so every loop bound is a constant and the
// small rank loops unroll into registers.
//
// One block computes TH output rows (all columns) of NIMG consecutive images:
//   1. the block's weights go to shared memory, transposed so the rank loops read
//      consecutive floats (float4, ranks padded to multiples of 4 with zeros);
//   2. the first 1x1 is computed once for every input position the tile's core taps read
//      (the tile plus its halo; zero outside the image, which is the core's zero padding,
//      since U * 0 = 0) into shared memory;
//   3. each thread takes one output pixel: the core taps from shared memory into R2
//      registers, then the last 1x1, bias, residual and ReLU, one store per output channel.
// Global memory sees one read of x (plus halo rows), one read of the residual and one write
// of y: the intermediate maps never leave the multiprocessor.
//
// Programmatic dependent launch (PDL, sm_90 and later): launched with the programmatic
// stream-serialization attribute, as the launcher does inside CUDA-graph capture, a layer's
// blocks may start while the previous kernel finishes. They stage their weights first, then
// wait (griddepcontrol.wait) until the previous grid has completed and its writes are
// visible, and only then read x and the residual or write y. Each block also lets the next
// kernel launch as soon as it starts. Launched without the attribute, the wait returns at
// once. Weights are read before the wait, so the launcher uses the attribute only where no
// kernel of the same stream can have just written them: inside a captured forward pass.
//
// Small batches (SPLIT > 1): one block then holds one image or less, and one thread per
// output pixel leaves most of the multiprocessor idle while each thread runs all R2 core
// outputs and all CO output channels. With SPLIT threads per pixel, phase 2 gives each
// thread R1P/SPLIT of the ranks, and phase 3 R2P/SPLIT core outputs, exchanged through shared
// memory, then CO/SPLIT output channels. Every register array is indexed by constants only;
// a thread's share is an offset into shared memory.
//
// Expected defines: C R1 R2 CO KH KW SH SW PH PW DH DW H W HO WO TH NIMG RELU RES NTHREADS
// R1P R2P (R1, R2 rounded up to multiples of 4) PDL (1 on sm_90 and later) SPLIT (threads
// per output pixel; SPLIT > 1 needs NTHREADS >= SPLIT * (NIMG * PIX rounded up to a multiple
// of 32) and SPLIT dividing R1P/4, R2P/4 and CO).

#define IH_T ((TH - 1) * SH + (KH - 1) * DH + 1)
#define IW_T ((WO - 1) * SW + (KW - 1) * DW + 1)
#define IPIX (IH_T * IW_T)
#define TILES ((HO + TH - 1) / TH)
#define PIX (TH * WO)
#define TAPS (KH * KW)

// shared-memory layout, in floats (each part a multiple of 4 so float4 reads stay aligned)
#define OFF_U 0                              // [C][R1P]
#define OFF_K (OFF_U + C * R1P)              // [TAPS][R1][R2P]
#define OFF_V (OFF_K + TAPS * R1 * R2P)      // [CO][R2P]
#define OFF_B (OFF_V + CO * R2P)             // [CO], padded to a multiple of 4
#define OFF_S (OFF_B + ((CO + 3) / 4) * 4)   // [NIMG][R1][IPIX]
#define OFF_T (OFF_S + NIMG * R1 * IPIX)     // SPLIT > 1: core outputs [R2P][NIMG * PIX]
#define R1Q (R1P / 4 / SPLIT)                // float4s of ranks per thread in phase 2
#define R2Q (R2P / 4 / SPLIT)                // float4s of core outputs per thread in phase 3
#define NPR (((NIMG * PIX + 31) / 32) * 32)  // SPLIT > 1: threads per share, whole warps

// acc += w * s, lane by lane
__device__ __forceinline__ void fma4(float4& acc, const float4 w, const float s)
{
    acc.x = fmaf(w.x, s, acc.x);
    acc.y = fmaf(w.y, s, acc.y);
    acc.z = fmaf(w.z, s, acc.z);
    acc.w = fmaf(w.w, s, acc.w);
}

// The core taps of one output pixel whose first-1x1 values start at sp (shared memory):
// R2Q float4s of core outputs, from float4 `first` of the padded R2P on
__device__ __forceinline__ void core_taps(float4 (&t)[R2Q], const float* sp, const float* sk,
                                          int first)
{
#pragma unroll
    for (int r = 0; r < R2Q; ++r) t[r] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int ky = 0; ky < KH; ++ky) {
#pragma unroll
        for (int kx = 0; kx < KW; ++kx) {
#pragma unroll
            for (int j = 0; j < R1; ++j) {
                const float s = sp[j * IPIX + ky * DH * IW_T + kx * DW];
                const float4* w4 =
                    reinterpret_cast<const float4*>(sk + ((ky * KW + kx) * R1 + j) * R2P) + first;
#pragma unroll
                for (int r = 0; r < R2Q; ++r) fma4(t[r], w4[r], s);
            }
        }
    }
}

// The epilogue of one output value at y[i]: + residual, ReLU, one store
__device__ __forceinline__ void store_out(float acc, const float* __restrict__ res,
                                          float* __restrict__ y, long i)
{
#if RES
    acc += __ldg(res + i);
#endif
#if RELU
    acc = acc < 0.0f ? 0.0f : acc;  // NaN stays NaN, as torch.relu
#endif
    y[i] = acc;
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
slimtorch_tucker_block_cuda(const float* __restrict__ x, const float* __restrict__ u,
                            const float* __restrict__ k, const float* __restrict__ v,
                            const float* __restrict__ bias, const float* __restrict__ res,
                            float* __restrict__ y, int n)
{
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    float* su = smem + OFF_U;
    float* sk = smem + OFF_K;
    float* sv = smem + OFF_V;
    float* sb = smem + OFF_B;
    float* s1 = smem + OFF_S;
    const int tid = threadIdx.x;
#if PDL
    asm volatile("griddepcontrol.launch_dependents;");
#endif

    // 1. weights, transposed and zero-padded (loops unrolled so a thread's loads are in
    // flight together: at small batches the block's latency is the kernel's time)
#pragma unroll 4
    for (int i = tid; i < C * R1P; i += NTHREADS) {
        const int c = i / R1P, j = i % R1P;
        su[i] = j < R1 ? u[j * C + c] : 0.0f;
    }
#pragma unroll 4
    for (int i = tid; i < TAPS * R1 * R2P; i += NTHREADS) {
        const int r = i % R2P, j = (i / R2P) % R1, tap = i / (R2P * R1);
        sk[i] = r < R2 ? k[(r * R1 + j) * TAPS + tap] : 0.0f;
    }
#pragma unroll 4
    for (int i = tid; i < CO * R2P; i += NTHREADS) {
        const int o = i / R2P, r = i % R2P;
        sv[i] = r < R2 ? v[o * R2 + r] : 0.0f;
    }
    for (int i = tid; i < CO; i += NTHREADS) sb[i] = bias[i];

    const int tile = blockIdx.x % TILES;
    const long img0 = (long)(blockIdx.x / TILES) * NIMG;
    const int oy0 = tile * TH;
    const int iy0 = oy0 * SH - PH;
#if PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");  // x, res and y from here on
#endif
    __syncthreads();

    // 2. first 1x1 over the tile and its halo (R1Q float4s of ranks per work item)
    for (int p = tid; p < NIMG * IPIX * SPLIT; p += NTHREADS) {
        const int part = p / (NIMG * IPIX), pq = p % (NIMG * IPIX);
        const int im = pq / IPIX, q = pq % IPIX;
        const int iy = iy0 + q / IW_T, ix = q % IW_T - PW;
        float4 acc[R1Q];
#pragma unroll
        for (int j = 0; j < R1Q; ++j) acc[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (img0 + im < n && iy >= 0 && iy < H && ix >= 0 && ix < W) {
            const float* xp = x + (img0 + im) * (long)(C * H * W) + iy * W + ix;
#if C <= 64
#pragma unroll  // all of a pixel's channel loads in flight at once
#else
#pragma unroll 16
#endif
            for (int c = 0; c < C; ++c) {
                const float xv = __ldg(xp + c * (H * W));
                const float4* w4 = reinterpret_cast<const float4*>(su + c * R1P) + part * R1Q;
#pragma unroll
                for (int j = 0; j < R1Q; ++j) fma4(acc[j], w4[j], xv);
            }
        }
        float* sp = s1 + im * (R1 * IPIX) + q;
        const int j0 = part * R1Q * 4;
#pragma unroll
        for (int j = 0; j < R1Q; ++j) {
            if (j0 + 4 * j + 0 < R1) sp[(j0 + 4 * j + 0) * IPIX] = acc[j].x;
            if (j0 + 4 * j + 1 < R1) sp[(j0 + 4 * j + 1) * IPIX] = acc[j].y;
            if (j0 + 4 * j + 2 < R1) sp[(j0 + 4 * j + 2) * IPIX] = acc[j].z;
            if (j0 + 4 * j + 3 < R1) sp[(j0 + 4 * j + 3) * IPIX] = acc[j].w;
        }
    }
    __syncthreads();

#if SPLIT > 1
    // 3. core taps (R2Q float4s of core outputs per thread) into shared memory, then the last
    // 1x1 and epilogue for CO / SPLIT output channels; one work item per thread
    {
        float* st = smem + OFF_T;
        const int part = tid / NPR, pq = tid % NPR;  // a warp shares one part
        const int im = pq / PIX, q = pq % PIX;
        const int ly = q / WO, ox = q % WO;
        const int oy = oy0 + ly;
        const bool active = part < SPLIT && pq < NIMG * PIX && oy < HO && img0 + im < n;
        if (active) {
            float4 t[R2Q];
            core_taps(t, s1 + im * (R1 * IPIX) + (ly * SH) * IW_T + ox * SW, sk, part * R2Q);
            float* tp = st + (part * R2Q * 4) * (NIMG * PIX) + pq;
#pragma unroll
            for (int r = 0; r < R2Q; ++r) {
                tp[(4 * r + 0) * (NIMG * PIX)] = t[r].x;
                tp[(4 * r + 1) * (NIMG * PIX)] = t[r].y;
                tp[(4 * r + 2) * (NIMG * PIX)] = t[r].z;
                tp[(4 * r + 3) * (NIMG * PIX)] = t[r].w;
            }
        }
        __syncthreads();
        if (active) {
            float tr[R2];
#pragma unroll
            for (int r = 0; r < R2; ++r) tr[r] = st[r * (NIMG * PIX) + pq];
            const long ob = (img0 + im) * (long)(CO * HO * WO) + oy * WO + ox;
#pragma unroll 4
            for (int i = 0; i < CO / SPLIT; ++i) {
                const int o = part * (CO / SPLIT) + i;
                const float* w = sv + o * R2P;
                float acc = sb[o];
#pragma unroll
                for (int r = 0; r < R2; ++r) acc = fmaf(w[r], tr[r], acc);
                store_out(acc, res, y, ob + o * (HO * WO));
            }
        }
    }
#else
    // 3. core taps, last 1x1 and epilogue, one output pixel per thread
    for (int p = tid; p < NIMG * PIX; p += NTHREADS) {
        const int im = p / PIX, q = p % PIX;
        const int ly = q / WO, ox = q % WO;
        const int oy = oy0 + ly;
        if (oy >= HO || img0 + im >= n) continue;
        float4 t[R2Q];  // R2Q is R2P / 4 here
        core_taps(t, s1 + im * (R1 * IPIX) + (ly * SH) * IW_T + ox * SW, sk, 0);
        const long ob = (img0 + im) * (long)(CO * HO * WO) + oy * WO + ox;
#pragma unroll 4
        for (int o = 0; o < CO; ++o) {
            const float4* w4 = reinterpret_cast<const float4*>(sv + o * R2P);
            float acc = sb[o];
#pragma unroll
            for (int r = 0; r < R2Q; ++r) {
                const float4 w = w4[r];
                acc = fmaf(w.x, t[r].x, acc);
                acc = fmaf(w.y, t[r].y, acc);
                acc = fmaf(w.z, t[r].z, acc);
                acc = fmaf(w.w, t[r].w, acc);
            }
            store_out(acc, res, y, ob + o * (HO * WO));
        }
    }
#endif
}
