// Expert parallelism's bucketing by destination (as shaders/bucket.wgsl, whose comments
// give the layout): the physical slot and send row of every kept route of this rank's
// tokens, and the routes per slot. Every pass takes the same arguments
// (kernel_abi::bucket::BINDINGS) and the passes run in the order and over the thread
// counts of kernel_abi::bucket::BucketSchedule. One block per logical expert walks its
// compact rows in order: no atomics, deterministic.
//
// scratch: inverse [S·k] | position [S·k] | slot [S·k] | base [P + 1]
// counts:  routes per slot [P], then S and the placement's fingerprint

#define BUCKET_ARGS const int* rows, const int* offsets, const int* rep_off, const int* rep_slots, int* scratch, \
    int* counts, int* send, BucketParams p

__device__ __forceinline__ bool bucket_sent(const int* rows, const BucketParams& p, u64 r) {
    u64 t = r / p.k;
    return rows[r] >= 0 && t >= p.t0 && t < p.t1;
}

extern "C" __global__ void bucket_clear(BUCKET_ARGS) {
    u64 i = global_id();
    if (i < (u64)p.s * p.k) scratch[i] = -1;
    if (i < p.slots) counts[i] = 0;
}

// inverse[compact row] = route, for the routes sent.
extern "C" __global__ void bucket_invert(BUCKET_ARGS) {
    u64 r = global_id();
    if (r >= (u64)p.s * p.k || !bucket_sent(rows, p, r)) return;
    scratch[rows[r]] = (int)r;
}

// One block of 64 threads (kernel_abi::WG_PLAN) per logical expert walks its compact rows
// in chunks of 64, in order, each row to replica token % replicas: a row's position in its
// slot is the slot's count before the chunk plus the rows of the chunk before it with the
// same slot; the last of them then writes the new count.
extern "C" __global__ void bucket_rank(BUCKET_ARGS) {
    __shared__ int chunk_slot[64];
    u32 e = blockIdx.x + blockIdx.y * gridDim.x;
    if (e >= p.e) return;  // the whole block: no barrier is left waiting
    u32 l = threadIdx.x;
    u64 sk = (u64)p.s * p.k;
    int first = rep_off[e];
    u32 reps = (u32)(rep_off[e + 1] - first);
    int end = offsets[e + 1];
    for (int q0 = offsets[e]; q0 < end; q0 += 64) {
        int q = q0 + (int)l, slot = -1, r = -1;
        if (q < end) {
            r = scratch[q];
            if (r >= 0) slot = rep_slots[first + ((u32)r / p.k) % reps];
        }
        chunk_slot[l] = slot;
        __syncthreads();
        int pos = 0;
        bool last = true;
        if (slot >= 0) {
            int before = 0;
            for (u32 i = 0; i < 64; i++) {
                if (chunk_slot[i] == slot) {
                    if (i < l) before++;
                    else if (i > l) last = false;
                }
            }
            pos = counts[slot] + before;
            scratch[sk + r] = pos;
            scratch[2 * sk + r] = slot;
        }
        __syncthreads();
        if (slot >= 0 && last) counts[slot] = pos + 1;
        __syncthreads();
    }
}

// Exclusive prefix of the counts: where each slot's rows start in the send buffer.
extern "C" __global__ void bucket_offsets(BUCKET_ARGS) {
    if (global_id() != 0) return;
    u64 base = 3 * (u64)p.s * p.k;
    int acc = 0;
    for (u32 s = 0; s < p.slots; s++) {
        scratch[base + s] = acc;
        acc += counts[s];
    }
    scratch[base + p.slots] = acc;
    counts[p.slots] = (int)p.s;
    counts[p.slots + 1] = (int)p.fingerprint;
}

extern "C" __global__ void bucket_rows(BUCKET_ARGS) {
    u64 r = global_id();
    u64 sk = (u64)p.s * p.k;
    if (r >= sk) return;
    if (bucket_sent(rows, p, r)) {
        int slot = scratch[2 * sk + r];
        send[r] = scratch[3 * sk + slot] + scratch[sk + r];
    } else {
        send[r] = -1;
    }
}
