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
// Expected defines: C R1 R2 CO KH KW SH SW PH PW DH DW H W HO WO TH NIMG RELU RES NTHREADS
// R1P R2P (R1, R2 rounded up to multiples of 4).

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

// acc += w * s, lane by lane
__device__ __forceinline__ void fma4(float4& acc, const float4 w, const float s)
{
    acc.x = fmaf(w.x, s, acc.x);
    acc.y = fmaf(w.y, s, acc.y);
    acc.z = fmaf(w.z, s, acc.z);
    acc.w = fmaf(w.w, s, acc.w);
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
    __syncthreads();

    // 2. first 1x1 over the tile and its halo
    for (int p = tid; p < NIMG * IPIX; p += NTHREADS) {
        const int im = p / IPIX, q = p % IPIX;
        const int iy = iy0 + q / IW_T, ix = q % IW_T - PW;
        float4 acc[R1P / 4];
#pragma unroll
        for (int j = 0; j < R1P / 4; ++j) acc[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (img0 + im < n && iy >= 0 && iy < H && ix >= 0 && ix < W) {
            const float* xp = x + (img0 + im) * (long)(C * H * W) + iy * W + ix;
#if C <= 64
#pragma unroll  // all of a pixel's channel loads in flight at once
#else
#pragma unroll 16
#endif
            for (int c = 0; c < C; ++c) {
                const float xv = __ldg(xp + c * (H * W));
                const float4* w4 = reinterpret_cast<const float4*>(su + c * R1P);
#pragma unroll
                for (int j = 0; j < R1P / 4; ++j) fma4(acc[j], w4[j], xv);
            }
        }
        float* sp = s1 + im * (R1 * IPIX) + q;
#pragma unroll
        for (int j = 0; j < R1P / 4; ++j) {
            if (4 * j + 0 < R1) sp[(4 * j + 0) * IPIX] = acc[j].x;
            if (4 * j + 1 < R1) sp[(4 * j + 1) * IPIX] = acc[j].y;
            if (4 * j + 2 < R1) sp[(4 * j + 2) * IPIX] = acc[j].z;
            if (4 * j + 3 < R1) sp[(4 * j + 3) * IPIX] = acc[j].w;
        }
    }
    __syncthreads();

    // 3. core taps, last 1x1 and epilogue, one output pixel per thread
    for (int p = tid; p < NIMG * PIX; p += NTHREADS) {
        const int im = p / PIX, q = p % PIX;
        const int ly = q / WO, ox = q % WO;
        const int oy = oy0 + ly;
        if (oy >= HO || img0 + im >= n) continue;
        float4 t[R2P / 4];
#pragma unroll
        for (int r = 0; r < R2P / 4; ++r) t[r] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const float* sp = s1 + im * (R1 * IPIX) + (ly * SH) * IW_T + ox * SW;
#pragma unroll
        for (int ky = 0; ky < KH; ++ky) {
#pragma unroll
            for (int kx = 0; kx < KW; ++kx) {
#pragma unroll
                for (int j = 0; j < R1; ++j) {
                    const float s = sp[j * IPIX + ky * DH * IW_T + kx * DW];
                    const float4* w4 =
                        reinterpret_cast<const float4*>(sk + ((ky * KW + kx) * R1 + j) * R2P);
#pragma unroll
                    for (int r = 0; r < R2P / 4; ++r) fma4(t[r], w4[r], s);
                }
            }
        }
        const long ob = (img0 + im) * (long)(CO * HO * WO) + oy * WO + ox;
#pragma unroll 4
        for (int o = 0; o < CO; ++o) {
            const float4* w4 = reinterpret_cast<const float4*>(sv + o * R2P);
            float acc = sb[o];
#pragma unroll
            for (int r = 0; r < R2P / 4; ++r) {
                const float4 w = w4[r];
                acc = fmaf(w.x, t[r].x, acc);
                acc = fmaf(w.y, t[r].y, acc);
                acc = fmaf(w.z, t[r].z, acc);
                acc = fmaf(w.w, t[r].w, acc);
            }
#if RES
            acc += __ldg(res + ob + o * (HO * WO));
#endif
#if RELU
            acc = acc < 0.0f ? 0.0f : acc;  // NaN stays NaN, as torch.relu
#endif
            y[ob + o * (HO * WO)] = acc;
        }
    }
}
