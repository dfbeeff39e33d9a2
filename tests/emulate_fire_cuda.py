"""CPU emulation of csrc/cuda/fire.cu (fused_fire_kernel) -- index math, shared memory, WMMA tiles.

    python tests/emulate_fire_cuda.py [--quick]

Not a pytest module (no test_ prefix): it is a reviewer's tool for a code base whose CUDA kernel
cannot run on the machines here. It ports the kernel's host planning (tile rows, squeeze chunk SC,
shared-memory layout, channel groups) and its device code line by line -- every per-thread
`for (idx = threadIdx.x; idx < total; idx += 256)` loop, the fp32 register blocks (lane/warp ->
pixels/channels) and every WMMA load/mma/store (a 16x16x16 mma is a matmul on the same shared-
memory layout) -- and runs it on small odd shapes against the float64 reference. It checks:

  * every shared-memory access is inside the launched dynamic smem size;
  * every shared-memory read returns an element written with the same address and element size
    (no read of stale / type-punned / never-written data, e.g. WMMA padding rows or columns);
  * no read-after-write, write-after-read or write-after-write between different threads (warps
    for WMMA) inside one barrier phase (phases are separated by the kernel's __syncthreads());
  * WMMA pointers are 32-byte aligned and ldm is a multiple of 16 bytes;
  * every global load is inside the tensor's storage; every output element is written exactly
    once (the output storage starts as NaN);
  * the result matches the float64 reference (the tensor-core paths: a reference that rounds the
    squeeze to the input dtype, as the kernel does).

Keep it in sync with fire.cu when the kernel changes (constants and function names match).
"""
import argparse
import itertools
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

# ---- constants of fire.cu ------------------------------------------------------------------
kThreads, kWarps, TW, HALO_W, MAX_TH, MAX_NPOS, TILE_PIX, CC, EC, SQ_FRAGS = 256, 8, 16, 18, 8, 192, 128, 32, 32, 6
TID = np.arange(kThreads)
LANE, WARP = TID & 31, TID >> 5
SMEM_OPTIN = 232448  # H200 sharedMemPerBlockOptin
SM_COUNT = 132


class EmuError(AssertionError):
    pass


def rnd(v, dt):
    """Round float64 values to the torch dtype dt (RNE) and back to float64."""
    return torch.from_numpy(np.asarray(v, dtype=np.float64)).to(dt).double().numpy()


# ---- shared memory model ---------------------------------------------------------------------
class Smem:
    def __init__(self, nbytes):
        self.n = nbytes
        self.val = np.full(nbytes, np.nan)
        self.start = np.full(nbytes, -1, np.int64)   # element start address of the last write
        self.esz = np.zeros(nbytes, np.int64)        # element size of the last write
        self.wphase = np.full(nbytes, -1, np.int64)
        self.wagent = np.full(nbytes, -1, np.int64)
        self.phase = 0
        self.phase_writes = []                       # (bytes, agents) arrays of this phase
        self.phase_reads = []                        # (bytes, agents) arrays of this phase

    def barrier(self):
        # write-write conflicts of the phase that ends
        if self.phase_writes:
            a = np.concatenate([w[0] for w in self.phase_writes])
            g = np.concatenate([w[1] for w in self.phase_writes])
            order = np.argsort(a, kind="stable")
            a, g = a[order], g[order]
            dup = (a[1:] == a[:-1]) & (g[1:] != g[:-1])
            if dup.any():
                raise EmuError(f"write-write race at smem byte {a[1:][dup][0]} in phase {self.phase}")
            # write-after-read: a byte read and (later) written by different agents in one phase
            # (read-after-write is caught at the read). Each written byte has one writer here.
            if self.phase_reads:
                rb = np.concatenate([r[0] for r in self.phase_reads])
                ra = np.concatenate([r[1] for r in self.phase_reads])
                i = np.minimum(np.searchsorted(a, rb), a.size - 1)
                war = (a[i] == rb) & (g[i] != ra)
                if war.any():
                    raise EmuError(f"write-after-read race at smem byte {rb[war][0]} in phase "
                                   f"{self.phase} (read by agent {ra[war][0]}, written by agent "
                                   f"{g[i][war][0]} with no barrier between)")
        self.phase_writes = []
        self.phase_reads = []
        self.phase += 1

    def _check_bounds(self, addr, esz, what):
        if addr.size and (addr.min() < 0 or addr.max() + esz > self.n):
            raise EmuError(f"{what}: smem access out of bounds [{addr.min()}, {addr.max() + esz}) "
                           f"of {self.n} bytes")
        if addr.size and (addr % esz).any():
            raise EmuError(f"{what}: misaligned smem access")

    def write(self, addr, vals, esz, agent, what):
        addr = np.asarray(addr, np.int64)
        shape = addr.shape
        addr = addr.ravel()
        vals = np.broadcast_to(np.asarray(vals, np.float64), shape).ravel()
        agent = np.broadcast_to(np.asarray(agent, np.int64), shape).ravel()
        self._check_bounds(addr, esz, what)
        for k in range(esz):
            b = addr + k
            self.start[b] = addr
            self.esz[b] = esz
            self.wphase[b] = self.phase
            self.wagent[b] = agent
        self.val[addr] = vals
        self.phase_writes.append((np.concatenate([addr + k for k in range(esz)]), np.tile(agent, esz)))

    def read(self, addr, esz, agent, what):
        addr = np.asarray(addr, np.int64)
        shape = addr.shape
        addr = addr.ravel()
        agent = np.broadcast_to(np.asarray(agent, np.int64), shape).ravel()
        self._check_bounds(addr, esz, what)
        for k in range(esz):
            b = addr + k
            bad = (self.start[b] != addr) | (self.esz[b] != esz)
            if bad.any():
                i = np.nonzero(bad)[0][0]
                raise EmuError(f"{what}: read of smem byte {addr[i] + k} that holds no element of this "
                               f"address/size (never written, or written with another layout)")
            race = (self.wphase[b] == self.phase) & (self.wagent[b] != agent)
            if race.any():
                i = np.nonzero(race)[0][0]
                raise EmuError(f"{what}: read-after-write race at smem byte {addr[i] + k} "
                               f"(written by agent {self.wagent[b][i]} in the same phase)")
        self.phase_reads.append((np.concatenate([addr + k for k in range(esz)]), np.tile(agent, esz)))
        return self.val[addr].reshape(shape)


WARP_AGENT = 10000  # WMMA accesses are warp-collective: agent = WARP_AGENT + warp


def wmma_load(sm, base, ldm, esz, layout, agent, what):
    """16x16 fragment at byte address base, leading dimension ldm (elements)."""
    if base % 32:
        raise EmuError(f"{what}: WMMA pointer not 32-byte aligned (byte {base})")
    if (ldm * esz) % 16:
        raise EmuError(f"{what}: WMMA ldm {ldm} not a multiple of 16 bytes")
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    if layout == "row":     # element (r, c) at r*ldm + c
        off = r * ldm + c
    else:                   # col_major: element (k=r, n=c) at c*ldm + r
        off = c * ldm + r
    return sm.read(base + off * esz, esz, agent, what)


def wmma_store(sm, base, ldm, frag, agent, what):
    if base % 32:
        raise EmuError(f"{what}: WMMA store pointer not 32-byte aligned")
    if (ldm * 4) % 16:
        raise EmuError(f"{what}: WMMA store ldm {ldm} not a multiple of 16 bytes")
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    sm.write(base + (r * ldm + c) * 4, rnd(frag, torch.float32), 4, agent, what)


# ---- global memory model ---------------------------------------------------------------------
class GTensor:
    """A strided view over a flat storage (numpy float64 values already rounded to the dtype)."""

    def __init__(self, t):
        base = t
        while base._base is not None:
            base = base._base
        self.flat = base.detach().double().contiguous().reshape(-1).numpy() if base.is_contiguous() else None
        if self.flat is None:  # e.g. channels_last base: take its storage order
            st = base.untyped_storage()
            self.flat = torch.empty(0, dtype=base.dtype).set_(st).double().numpy()
        self.offset = t.storage_offset()
        self.strides = t.stride()
        self.t = t

    def load(self, off):
        off = np.asarray(off, np.int64) + self.offset
        if off.size and (off.min() < 0 or off.max() >= self.flat.size):
            raise EmuError(f"global load out of the storage [{off.min()}, {off.max()}] of {self.flat.size}")
        return self.flat[off]


class GOut:
    def __init__(self, shape, strides):
        self.size = int(np.prod(shape))
        self.flat = np.full(self.size, np.nan)
        self.count = np.zeros(self.size, np.int64)
        self.shape, self.strides = shape, strides

    def store(self, off, vals):
        off = np.asarray(off, np.int64)
        if off.size and (off.min() < 0 or off.max() >= self.size):
            raise EmuError("global store out of bounds")
        np.add.at(self.count, off, 1)
        self.flat[off] = vals

    def tensor(self):
        return torch.as_strided(torch.from_numpy(self.flat), self.shape, self.strides)


# ---- host planning (launch_fire / plan_smem) -------------------------------------------------
def round_up(v, m):
    return (v + m - 1) // m * m


def plan_smem(p, tc, SC):
    esz = 2 if tc else 4
    p["SC"] = SC
    if tc:
        p["ldS"] = SC + 16 if SC % 32 == 0 else SC
        p["ldX"] = CC + 16
        p["ldW"] = p["ldS"]
        p["ldF"] = SC + 4
        p["ldO"] = EC + 4
    else:
        p["ldS"] = SC + 1
        p["ldX"] = CC + 1
        p["ldW"] = SC
        p["ldF"] = 0
        p["ldO"] = EC + 1
    sq_bytes = round_up(MAX_NPOS * p["ldS"] * esz, 128)
    xs_bytes = round_up(MAX_NPOS * p["ldX"] * esz, 128)
    ws_bytes = round_up(SC * p["ldX"] * esz, 128)
    sqf_bytes = round_up(MAX_NPOS * p["ldF"] * 4, 128) if tc else 0
    wt_bytes = round_up(9 * EC * p["ldW"] * esz, 128)
    st_bytes = round_up(TILE_PIX * p["ldO"] * 4, 128)
    u_bytes = max(xs_bytes + ws_bytes, sqf_bytes, wt_bytes, st_bytes)
    p["off_u"] = sq_bytes
    p["off_ws"] = xs_bytes
    p["smem_bytes"] = sq_bytes + u_bytes
    return p["smem_bytes"]


def plan(N, C, H, W, S, E1, E3, tc, G=None):
    p = dict(N=N, C=C, H=H, W=W, S=S, E1=E1, E3=E3)
    tiles_y = (H + MAX_TH - 1) // MAX_TH
    p["th"] = (H + tiles_y - 1) // tiles_y
    p["tiles_y"] = (H + p["th"] - 1) // p["th"]
    p["tiles_x"] = (W + TW - 1) // TW
    p["n1"] = (E1 + EC - 1) // EC
    p["n3"] = (E3 + EC - 1) // EC
    SC = min(round_up(S, 16), 64)
    while plan_smem(p, tc, SC) > SMEM_OPTIN and SC > 16:
        SC -= 16
    assert p["smem_bytes"] <= SMEM_OPTIN
    p["nsc"] = (S + SC - 1) // SC
    regs = 128 if tc else 176
    per_sm = max(1, min(65536 // (regs * kThreads), (228 * 1024) // (p["smem_bytes"] + 1024)))
    slots = SM_COUNT * per_sm
    tiles = N * p["tiles_x"] * p["tiles_y"]
    gmax = max(1, max(p["n1"], p["n3"]))
    npos = (p["th"] + 2) * HALO_W
    sq_cost = npos * C * round_up(S, 16)
    bestG, best = 1, 0.0
    for g in range(1, gmax + 1):
        c1, c3 = (p["n1"] + g - 1) // g, (p["n3"] + g - 1) // g
        ex_cost = TW * p["th"] * round_up(S, 16) * (c1 + 9.0 * c3) * EC
        per_block = sq_cost * ((c1 + c3) if p["nsc"] > 1 else 1) + ex_cost + 2.0e4
        blocks = tiles * g
        waves = (blocks + slots - 1) // slots
        cost = waves * per_block
        if g == 1 or cost < best * 0.97:
            best, bestG = cost, g
    p["G"] = bestG if G is None else G
    assert 1 <= p["G"] <= gmax
    p["total_blocks"] = tiles * p["G"]
    return p


# ---- device code ---------------------------------------------------------------------------
def strided_loop(total):
    """for (idx = threadIdx.x; idx < total; idx += kThreads): all (idx, thread) pairs."""
    idx = np.arange(total)
    return idx, idx % kThreads


def stage_squeeze_chunk(p, sm, x, wsq, xs_b, ws_b, esz, dt, n, ty0, tx0, c0, s0, npos_pad):
    npos = (p["th"] + 2) * HALO_W
    total = npos_pad * CC
    idx, thr = strided_loop(total)
    if p["cl_x"]:
        c, hpos = idx % CC, idx // CC
    else:
        hpos, c = idx % npos_pad, idx // npos_pad
    v = np.zeros(total)
    gc = c0 + c
    hy = hpos // HALO_W
    hx = hpos - hy * HALO_W
    gy, gx = ty0 - 1 + hy, tx0 - 1 + hx
    m = (hpos < npos) & (gc < p["C"]) & (gy >= 0) & (gy < p["H"]) & (gx >= 0) & (gx < p["W"])
    xs_ = x.strides
    v[m] = x.load(n * xs_[0] + gc[m] * xs_[1] + gy[m] * xs_[2] + gx[m] * xs_[3])
    sm.write(xs_b + (hpos * p["ldX"] + c) * esz, v, esz, thr, "stage xs")
    wtotal = p["SC"] * CC
    idx, thr = strided_loop(wtotal)
    c, s = idx % CC, idx // CC
    gc, gs = c0 + c, s0 + s
    v = np.zeros(wtotal)
    m = (gc < p["C"]) & (gs < p["S"])
    v[m] = wsq.load(gs[m] * wsq.strides[0] + gc[m] * wsq.strides[1])
    sm.write(ws_b + (s * p["ldX"] + c) * esz, v, esz, thr, "stage ws")


def stage_expand_weights(p, sm, w, ntaps, E, e0, s0, wt_b, esz):
    total = EC * p["SC"] * ntaps
    idx, thr = strided_loop(total)
    t = idx % ntaps
    r = idx // ntaps
    s = r % p["SC"]
    e = r // p["SC"]
    ge, gs = e0 + e, s0 + s
    v = np.zeros(total)
    m = (ge < E) & (gs < p["S"])
    st = w.strides
    off = ge * st[0] + gs * st[1]
    if ntaps == 9:
        off = off + (t // 3) * st[2] + (t % 3) * st[3]
    v[m] = w.load(off[m])
    sm.write(wt_b + ((t * EC + e) * p["ldW"] + s) * esz, v, esz, thr, "stage wt")


def store_output_chunk(p, sm, out, st_b, bias, E, e0, cbase, n, ty0, tx0, dt):
    total = TILE_PIX * EC
    idx, thr = strided_loop(total)
    if p["cl_out"]:
        ch, pix = idx % EC, idx // EC
    else:
        pix, ch = idx % TILE_PIX, idx // TILE_PIX
    oy, ox = pix // TW, pix % TW
    gy, gx = ty0 + oy, tx0 + ox
    ge = e0 + ch
    m = (oy < p["th"]) & (gy < p["H"]) & (gx < p["W"]) & (ge < E)
    v = sm.read(st_b + (pix[m] * p["ldO"] + ch[m]) * 4, 4, thr[m], "store reads st")
    if bias is not None:
        v = v + bias.load(ge[m])
    os_ = out.strides
    out.store(n * os_[0] + (cbase + ge[m]) * os_[1] + gy[m] * os_[2] + gx[m] * os_[3],
              rnd(np.maximum(v, 0.0), dt))


def squeeze_f32(p, sm, x, wsq, bsq, n, ty0, tx0, s0):
    sq_b, xs_b, ws_b = 0, p["off_u"], p["off_u"] + p["off_ws"]
    acc = np.zeros((kThreads, 6, 8))
    for c0 in range(0, p["C"], CC):
        sm.barrier()
        stage_squeeze_chunk(p, sm, x, wsq, xs_b, ws_b, 4, torch.float32, n, ty0, tx0, c0, s0, MAX_NPOS)
        sm.barrier()
        cn = min(CC, p["C"] - c0)
        c = np.arange(cn)
        i = np.arange(6)
        xv = sm.read(xs_b + ((LANE[:, None, None] + 32 * i[None, :, None]) * p["ldX"] + c[None, None, :]) * 4,
                     4, TID[:, None, None], "squeeze xv")                     # [t, i, c]
        j = np.arange(8)
        s = WARP[:, None] + kWarps * j[None, :]                               # [t, j]
        wv = np.zeros((kThreads, 8, cn))
        m = s < p["SC"]
        tt, jj = np.nonzero(m)
        wv[tt, jj, :] = sm.read(ws_b + (s[tt, jj][:, None] * p["ldX"] + c[None, :]) * 4, 4,
                                tt[:, None], "squeeze wv")
        acc += np.einsum("tic,tjc->tij", xv, wv)
    npos = (p["th"] + 2) * HALO_W
    for i in range(6):
        hpos = LANE + 32 * i
        hy = hpos // HALO_W
        hx = hpos - hy * HALO_W
        gy, gx = ty0 - 1 + hy, tx0 - 1 + hx
        inside = (hpos < npos) & (gy >= 0) & (gy < p["H"]) & (gx >= 0) & (gx < p["W"])
        for j in range(8):
            s = WARP + kWarps * j
            m = s < p["SC"]
            v = np.zeros(kThreads)
            mm = m & inside & (s0 + s < p["S"])
            v[mm] = acc[mm, i, j]
            if bsq is not None:
                v[mm] += bsq.load(s0 + s[mm])
            v = np.maximum(v, 0.0)
            sm.write(sq_b + (hpos[m] * p["ldS"] + s[m]) * 4, rnd(v[m], torch.float32), 4, TID[m], "squeeze sq")
    sm.barrier()


def squeeze_tc(p, sm, x, wsq, bsq, n, ty0, tx0, s0, dt):
    esz = 2
    sq_b, xs_b, ws_b, sqf_b = 0, p["off_u"], p["off_u"] + p["off_ws"], p["off_u"]
    npos = (p["th"] + 2) * HALO_W
    nmt = (npos + 15) // 16
    nnt = p["SC"] // 16
    nfr = nmt * nnt
    assert nfr <= kWarps * SQ_FRAGS
    acc = np.zeros((kWarps, SQ_FRAGS, 16, 16))
    for c0 in range(0, p["C"], CC):
        sm.barrier()
        stage_squeeze_chunk(p, sm, x, wsq, xs_b, ws_b, esz, dt, n, ty0, tx0, c0, s0, nmt * 16)
        sm.barrier()
        kn = min(CC, p["C"] - c0)
        for k in range(CC // 16):
            if k * 16 < kn:
                for i in range(SQ_FRAGS):
                    for warp in range(kWarps):
                        f = warp + kWarps * i
                        if f < nfr:
                            m, nt = f % nmt, f // nmt
                            ag = WARP_AGENT + warp
                            a = wmma_load(sm, xs_b + ((m * 16) * p["ldX"] + k * 16) * esz, p["ldX"], esz, "row", ag, "sq A")
                            b = wmma_load(sm, ws_b + ((nt * 16) * p["ldX"] + k * 16) * esz, p["ldX"], esz, "col", ag, "sq B")
                            acc[warp, i] = rnd(acc[warp, i] + a @ b, torch.float32)
    sm.barrier()
    for i in range(SQ_FRAGS):
        for warp in range(kWarps):
            f = warp + kWarps * i
            if f < nfr:
                m, nt = f % nmt, f // nmt
                wmma_store(sm, sqf_b + ((m * 16) * p["ldF"] + nt * 16) * 4, p["ldF"], acc[warp, i],
                           WARP_AGENT + warp, "sqf store")
    sm.barrier()
    total = MAX_NPOS * p["SC"]
    idx, thr = strided_loop(total)
    s, hpos = idx % p["SC"], idx // p["SC"]
    hy = hpos // HALO_W
    hx = hpos - hy * HALO_W
    gy, gx = ty0 - 1 + hy, tx0 - 1 + hx
    v = np.zeros(total)
    m = (hpos < npos) & (gy >= 0) & (gy < p["H"]) & (gx >= 0) & (gx < p["W"]) & (s0 + s < p["S"])
    v[m] = sm.read(sqf_b + (hpos[m] * p["ldF"] + s[m]) * 4, 4, thr[m], "sq convert")
    if bsq is not None:
        v[m] += bsq.load(s0 + s[m])
    v = np.maximum(v, 0.0)
    sm.write(sq_b + (hpos * p["ldS"] + s) * esz, rnd(v, dt), esz, thr, "sq tile")
    sm.barrier()


class ExpandF32:
    def zero(self):
        self.acc = np.zeros((kThreads, 4, 4))

    def accumulate(self, p, sm, sq_b, wt_b, ntaps, sn):
        i = np.arange(4)
        pix = LANE[:, None] + 32 * i[None, :]
        hp = (pix // TW) * HALO_W + (pix % TW)                                # [t, i]
        s = np.arange(sn)
        for t in range(ntaps):
            tt = 4 if ntaps == 1 else t
            off = (tt // 3) * HALO_W + (tt % 3)
            wrow = wt_b + ((t * EC + WARP) * p["ldW"]) * 4                    # [t]
            a = sm.read(sq_b + ((hp[:, :, None] + off) * p["ldS"] + s[None, None, :]) * 4, 4,
                        TID[:, None, None], "f32 expand a")                   # [t, i, s]
            j = np.arange(4)
            b = sm.read(wrow[:, None, None] + (((kWarps * j)[None, :, None]) * p["ldW"] + s[None, None, :]) * 4,
                        4, TID[:, None, None], "f32 expand b")                # [t, j, s]
            self.acc += np.einsum("tis,tjs->tij", a, b)

    def to_staging(self, p, sm, st_b):
        for i in range(4):
            for j in range(4):
                sm.write(st_b + ((LANE + 32 * i) * p["ldO"] + WARP + kWarps * j) * 4,
                         rnd(self.acc[:, i, j], torch.float32), 4, TID, "f32 staging")


class ExpandTC:
    def zero(self):
        self.acc = np.zeros((kWarps, EC // 16, 16, 16))

    def accumulate(self, p, sm, sq_b, wt_b, ntaps, sn):
        esz = 2
        kt = (sn + 15) // 16
        for warp in range(kWarps):
            ag = WARP_AGENT + warp
            for t in range(ntaps):
                tt = 4 if ntaps == 1 else t
                off = (tt // 3) * HALO_W + (tt % 3)
                arow = sq_b + ((warp * HALO_W + off) * p["ldS"]) * esz
                brow = wt_b + ((t * EC) * p["ldW"]) * esz
                for k in range(kt):
                    a = wmma_load(sm, arow + k * 16 * esz, p["ldS"], esz, "row", ag, "expand A")
                    for j in range(EC // 16):
                        b = wmma_load(sm, brow + ((j * 16) * p["ldW"] + k * 16) * esz, p["ldW"], esz, "col", ag,
                                      "expand B")
                        self.acc[warp, j] = rnd(self.acc[warp, j] + a @ b, torch.float32)

    def to_staging(self, p, sm, st_b):
        for warp in range(kWarps):
            for j in range(EC // 16):
                wmma_store(sm, st_b + ((warp * 16) * p["ldO"] + j * 16) * 4, p["ldO"], self.acc[warp, j],
                           WARP_AGENT + warp, "expand staging")


def group_count(nchunks, g, G):
    return (nchunks - g + G - 1) // G if nchunks > g else 0


def run_kernel(p, dt, x, wsq, bsq, we1, be1, we3, be3, out, grid):
    tc = dt != torch.float32
    esz = 2 if tc else 4
    ntiles = p["tiles_x"] * p["tiles_y"]
    for block in range(grid):
        sm = Smem(p["smem_bytes"])
        sq_b = wt_b = st_b = None
        sq_b, wt_b, st_b = 0, p["off_u"], p["off_u"]
        for blk in range(block, p["total_blocks"], grid):
            g = blk % p["G"]
            rest = blk // p["G"]
            tile = rest % ntiles
            n = rest // ntiles
            ty0 = (tile // p["tiles_x"]) * p["th"]
            tx0 = (tile % p["tiles_x"]) * TW
            cnt1 = group_count(p["n1"], g, p["G"])
            cnt3 = group_count(p["n3"], g, p["G"])
            sq_ready = False
            for q in range(cnt1 + cnt3):
                is3 = q >= cnt1
                chunk = g + p["G"] * ((q - cnt1) if is3 else q)
                e0 = chunk * EC
                ntaps = 9 if is3 else 1
                E = p["E3"] if is3 else p["E1"]
                ex = ExpandTC() if tc else ExpandF32()
                ex.zero()
                for sc in range(p["nsc"]):
                    s0 = sc * p["SC"]
                    if p["nsc"] > 1 or not sq_ready:
                        if tc:
                            squeeze_tc(p, sm, x, wsq, bsq, n, ty0, tx0, s0, dt)
                        else:
                            squeeze_f32(p, sm, x, wsq, bsq, n, ty0, tx0, s0)
                        sq_ready = True
                    sm.barrier()
                    if is3:
                        stage_expand_weights(p, sm, we3, 9, p["E3"], e0, s0, wt_b, esz)
                    else:
                        stage_expand_weights(p, sm, we1, 1, p["E1"], e0, s0, wt_b, esz)
                    sm.barrier()
                    ex.accumulate(p, sm, sq_b, wt_b, ntaps, min(p["SC"], p["S"] - s0))
                sm.barrier()
                ex.to_staging(p, sm, st_b)
                sm.barrier()
                store_output_chunk(p, sm, out, st_b, be3 if is3 else be1, E, e0, p["E1"] if is3 else 0,
                                   n, ty0, tx0, dt)
            sm.barrier()


# ---- driver --------------------------------------------------------------------------------
def make_case(n, c, h, w, s, e1, e3, dt, layout, bias, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    if layout == "sliced":
        x = r(n, 2 * c, h + 3, w + 4)[:, ::2, 1:h + 1, 2:w + 2]
    elif layout == "permuted":
        x = r(n, h, c, w).transpose(1, 2)
    elif layout == "channels_last":
        x = r(n, c, h, w).contiguous(memory_format=torch.channels_last)
    else:
        x = r(n, c, h, w)
    w_sq = r(s, 2 * c, 1, 1, scale=c ** -0.5)[:, ::2] if layout == "sliced" else r(s, c, 1, 1, scale=c ** -0.5)
    w_e1 = r(e1, s, 1, 1, scale=s ** -0.5)
    w_e3 = r(e3, s, 3, 3, scale=(9 * s) ** -0.5)
    if layout == "permuted":
        w_e3 = w_e3.transpose(2, 3).contiguous().transpose(2, 3)
    bs = [r(k, scale=0.5) if bias else None for k in (s, e1, e3)]
    return x, w_sq, bs[0], w_e1, bs[1], w_e3, bs[2]


def reference(args, dt):
    x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3 = [None if a is None else a.double() for a in args]
    s = F.relu(F.conv2d(x, w_sq, b_sq))
    if dt != torch.float32:
        s = s.to(dt).double()   # the kernel rounds the squeeze to the input dtype
    return torch.cat([F.relu(F.conv2d(s, w_e1, b_e1)), F.relu(F.conv2d(s, w_e3, b_e3, padding=1))], 1)


def emulate(n, c, h, w, s, e1, e3, dt, layout="nchw", bias=True, G=None, grid=None, seed=0):
    args = make_case(n, c, h, w, s, e1, e3, dt, layout, bias, seed)
    x = args[0]
    tc = dt != torch.float32
    p = plan(n, c, h, w, s, e1, e3, tc, G)
    p["cl_x"] = int(x.stride(1) == 1 and c > 1)
    cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    shape = (n, e1 + e3, h, w)
    strides = torch.empty(shape).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format).stride()
    p["cl_out"] = int(strides[1] == 1 and (e1 + e3) > 1)
    out = GOut(shape, strides)
    gts = [None if a is None else GTensor(a) for a in args]
    grid = p["total_blocks"] if grid is None else min(grid, p["total_blocks"])
    run_kernel(p, dt, *gts, out, grid)
    if (out.count != 1).any():
        bad = np.nonzero(out.count != 1)[0]
        raise EmuError(f"{len(bad)} output elements written {sorted(set(out.count[bad].tolist()))} times (not once)")
    y = out.tensor()
    ref = reference(args, dt)
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    tol = 1e-5 if dt == torch.float32 else 1e-2
    if not err <= tol:
        raise EmuError(f"rel err {err:.3g} > {tol}")
    return p, err


CASES = [
    # (n, c, h, w, s, e1, e3, layout, bias, G, grid)
    (1, 3, 1, 1, 5, 17, 3, "nchw", True, None, None),
    (2, 5, 1, 7, 3, 5, 17, "nchw", False, None, 1),          # grid-stride: one block does all
    (1, 17, 2, 3, 17, 3, 5, "channels_last", True, None, None),
    (2, 17, 7, 1, 5, 17, 17, "nchw", True, None, 2),
    (1, 33, 9, 17, 16, 33, 31, "sliced", True, None, 3),    # 2 row tiles (th=5), 2 column tiles
    (1, 7, 17, 20, 70, 40, 9, "nchw", True, None, 2),       # S > 64: squeeze chunks
    (1, 40, 10, 5, 130, 20, 36, "channels_last", False, 2, 3),
    (1, 24, 11, 19, 16, 20, 36, "permuted", True, None, None),
    (1, 64, 13, 13, 16, 64, 64, "channels_last", True, 2, 3),
    (2, 3, 31, 5, 1, 1, 1, "nchw", True, None, 4),
    (1, 40, 6, 6, 24, 40, 24, "nchw", True, None, None),
    (1, 12, 8, 16, 48, 70, 40, "nchw", True, 3, 2),          # th = 8: 12 M tiles in the squeeze
    (1, 9, 6, 10, 20, 5, 100, "channels_last", True, 3, 2),  # groups 1, 2 have no expand1 chunk
    (2, 6, 1, 1, 33, 2, 3, "channels_last", True, None, None),  # 1x1 map, channels_last input
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    a = ap.parse_args(argv)
    dts = [getattr(torch, d) for d in a.dtypes.split(",")]
    cases = CASES[:4] if a.quick else CASES
    fails = 0
    for case, dt in itertools.product(cases, dts):
        n, c, h, w, s, e1, e3, layout, bias, G, grid = case
        try:
            p, err = emulate(n, c, h, w, s, e1, e3, dt, layout, bias, G, grid, seed=sum(case[:7]))
            print(f"ok   {str(dt):15} {case}  th={p['th']} SC={p['SC']} nsc={p['nsc']} G={p['G']} "
                  f"blocks={p['total_blocks']} smem={p['smem_bytes']} err={err:.2e}", flush=True)
        except EmuError as e:
            fails += 1
            print(f"FAIL {str(dt):15} {case}: {e}", flush=True)
    print(f"{fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
